package backend

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestConnectFailureEjects: one connection Envoy could not open to a host
// ejects it at once, through the same ejection as 5xx in a row (its
// backoff, its readmission), counted under reason connect_failure; a 503
// of the host's own still needs ConsecutiveFailures in a row.
func TestConnectFailureEjects(t *testing.T) {
	c := &clock{now: time.Unix(1000, 0)}
	r := newRecorder()
	m := NewMetrics()
	w, err := New(r, []string{addr}, Options{Outlier: Outlier{ConsecutiveFailures: 3, BaseEjection: 5 * time.Second,
		MaxEjection: 30 * time.Second}, Now: c.Now, After: c.After}, m)
	if err != nil {
		t.Fatal(err)
	}
	w.Observe(addr, 503)
	w.Observe(addr, 503)
	if r.healthOf(addr).Down {
		t.Fatal("two 503s ejected the host")
	}
	w.Observe(addr, ConnectFailure)
	h := r.healthOf(addr)
	if !h.Down || h.Until.Sub(c.Now()) != 5*time.Second || !strings.Contains(h.Reason, "could not connect") {
		t.Fatalf("after one connect failure: %+v, want ejected for 5s by the connect failure", h)
	}
	if got := testutil.ToFloat64(m.ejections.WithLabelValues(addr, "connect_failure")); got != 1 {
		t.Fatalf("ejections{reason=connect_failure} = %v, want 1", got)
	}
	if got := testutil.ToFloat64(m.ejections.WithLabelValues(addr, "responses")); got != 0 {
		t.Fatalf("ejections{reason=responses} = %v, want 0", got)
	}
	// Requests in flight when it was ejected fail too: no longer ejection.
	w.Observe(addr, ConnectFailure)
	if got := r.healthOf(addr).Until; got != h.Until {
		t.Fatalf("a connect failure while ejected moved the end to %v", got)
	}
	c.advance(5 * time.Second)
	if h := r.healthOf(addr); h.Down {
		t.Fatalf("after 5s: %+v, want readmitted", h)
	}
	// Soon after, the next one backs off as 5xx ejections do.
	w.Observe(addr, ConnectFailure)
	if h := r.healthOf(addr); !h.Down || h.Until.Sub(c.Now()) != 10*time.Second {
		t.Fatalf("second ejection in a row: %+v, want 10s", h)
	}
	c.advance(10 * time.Second)
	// The host's own 5xx: three in a row, as before.
	w.Observe(addr, 500)
	w.Observe(addr, 502)
	if r.healthOf(addr).Down {
		t.Fatal("two 5xx ejected the host")
	}
	w.Observe(addr, 503)
	if h := r.healthOf(addr); !h.Down || !strings.Contains(h.Reason, "5xx") {
		t.Fatalf("after three 5xx: %+v", h)
	}
	if got := testutil.ToFloat64(m.ejections.WithLabelValues(addr, "responses")); got != 1 {
		t.Fatalf("ejections{reason=responses} = %v, want 1", got)
	}
}

// TestConnectFailureOffWithPassiveEjection: with passive ejection off
// (consecutive_5xx 0), a connect failure ejects nothing either.
func TestConnectFailureOffWithPassiveEjection(t *testing.T) {
	r := newRecorder()
	w, _ := New(r, []string{addr}, Options{}, nil)
	w.Observe(addr, ConnectFailure)
	if len(r.told) != 0 {
		t.Fatalf("told %s with passive ejection off", <-r.told)
	}
}

// TestConnectFailureBoundedAndHandedOver: connect failures on every host
// eject at most MaxEjectionPercent of them; an ejection that ends while
// the last health check failed leaves the host to the checks.
func TestConnectFailureBoundedAndHandedOver(t *testing.T) {
	hosts := []string{"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"}
	c := &clock{now: time.Unix(1000, 0)}
	r := newRecorder()
	m := NewMetrics()
	w, _ := New(r, hosts, Options{Outlier: Outlier{ConsecutiveFailures: 3, BaseEjection: time.Second, MaxEjectionPercent: 50},
		Now: c.Now, After: c.After}, m)
	for _, h := range hosts {
		w.Observe(h, ConnectFailure)
	}
	down := 0
	for _, h := range hosts {
		if r.healthOf(h).Down {
			down++
		}
	}
	if down != 2 {
		t.Fatalf("%d of 4 hosts ejected, want 2 (50%%)", down)
	}
	if got := testutil.ToFloat64(m.ejections.WithLabelValues(hosts[3], "skipped_max_percent")); got != 1 {
		t.Fatalf("ejections{reason=skipped_max_percent} = %v, want 1", got)
	}

	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(503) }))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	r = newRecorder()
	w, _ = New(r, []string{host}, Options{Health: HealthCheck{Interval: time.Hour, UnhealthyThreshold: 5, HealthyThreshold: 1},
		Outlier: Outlier{ConsecutiveFailures: 3, BaseEjection: 5 * time.Second}, Now: c.Now, After: c.After}, nil)
	w.check(context.Background(), host) // one failure: not enough to eject
	w.Observe(host, ConnectFailure)
	c.advance(5 * time.Second)
	if h := r.healthOf(host); !h.Down || h.Reason != "ejected after Envoy could not connect to it, and the last health check failed" {
		t.Fatalf("after the ejection, with the last check failed: %+v", h)
	}
}
