package backend

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestActiveChecks(t *testing.T) {
	var status atomic.Int32
	status.Store(200)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/healthz" {
			t.Errorf("checked %s", r.URL.Path)
		}
		w.WriteHeader(int(status.Load()))
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	r := newRecorder()
	w, err := New(r, []string{host}, Options{Health: HealthCheck{Path: "/healthz", Interval: time.Millisecond,
		UnhealthyThreshold: 2, HealthyThreshold: 3}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { w.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	status.Store(503)
	if got := <-r.told; got != "health "+host {
		t.Fatalf("told %s", got)
	}
	h := r.healthOf(host)
	if !h.Down || !strings.Contains(h.Reason, "status 503") || !strings.Contains(h.Reason, "2 in a row") {
		t.Fatalf("after failing checks: %+v", h)
	}
	status.Store(200)
	<-r.told
	if h := r.healthOf(host); h.Down {
		t.Fatalf("after passing checks: %+v", h)
	}
	m := w.m
	if n := testCounter(m, host, "failed"); n < 2 {
		t.Errorf("failed checks counted %v", n)
	}
}

func testCounter(m *Metrics, host, result string) float64 {
	c, _ := m.checks.GetMetricWithLabelValues(host, result)
	return readCounter(c)
}

func readCounter(c prometheus.Counter) float64 { return testutil.ToFloat64(c) }

// TestRedirectsFail: a host whose health check redirects (to a page that
// answers 200, even on another host) fails the check, and the watcher never
// fetches where the redirect points.
func TestRedirectsFail(t *testing.T) {
	var elsewhere atomic.Int32
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { elsewhere.Add(1) }))
	defer other.Close()
	redirecting := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, other.URL+"/health", http.StatusFound)
	}))
	defer redirecting.Close()
	addr := strings.TrimPrefix(redirecting.URL, "http://")
	rec := newRecorder()
	w, err := New(rec, []string{addr}, Options{Health: HealthCheck{Path: "/health", Interval: time.Hour, Timeout: time.Second,
		UnhealthyThreshold: 1, HealthyThreshold: 1}, Client: &http.Client{}}, NewMetrics())
	if err != nil {
		t.Fatal(err)
	}
	w.check(context.Background(), addr)
	if h := rec.healthOf(addr); !h.Down {
		t.Fatalf("a redirecting health check left the host %+v, want down", h)
	}
	if n := elsewhere.Load(); n != 0 {
		t.Fatalf("the watcher followed the redirect %d times", n)
	}
}
