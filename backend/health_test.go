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
