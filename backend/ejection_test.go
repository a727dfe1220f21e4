package backend

import (
	"bytes"
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestPassiveEjection(t *testing.T) {
	c := &clock{now: time.Unix(1000, 0)}
	r := newRecorder()
	w, err := New(r, []string{addr}, Options{Outlier: Outlier{ConsecutiveFailures: 3, BaseEjection: 5 * time.Second,
		MaxEjection: 30 * time.Second}, Now: c.Now, After: c.After}, nil)
	if err != nil {
		t.Fatal(err)
	}
	// A success between failures resets the count.
	for _, st := range []int{500, 503, 200, 502, 429, 500, 404} {
		w.Observe(addr, st)
	}
	if r.healthOf(addr).Down {
		t.Fatal("ejected without three 5xx in a row")
	}
	// Ejections in a row last 5 s, 10 s, 20 s, then the 30 s cap.
	for i, want := range []time.Duration{5 * time.Second, 10 * time.Second, 20 * time.Second, 30 * time.Second} {
		w.Observe(addr, 500)
		w.Observe(addr, 503)
		w.Observe(addr, 503)
		h := r.healthOf(addr)
		if !h.Down || h.Until.Sub(c.Now()) != want || !strings.Contains(h.Reason, "5xx") || !strings.Contains(h.Reason, "503") {
			t.Fatalf("ejection %d: %+v, want down for %v", i+1, h, want)
		}
		// More failures while ejected (requests already in flight) do not
		// extend it.
		w.Observe(addr, 500)
		w.Observe(addr, 500)
		w.Observe(addr, 500)
		if got := r.healthOf(addr).Until; got != h.Until {
			t.Fatalf("ejection %d extended to %v", i+1, got)
		}
		c.advance(want - time.Millisecond)
		if !r.healthOf(addr).Down {
			t.Fatalf("ejection %d ended early", i+1)
		}
		c.advance(time.Millisecond)
		if h := r.healthOf(addr); h.Down || !strings.Contains(h.Reason, "recovered") {
			t.Fatalf("ejection %d did not end after %v: %+v", i+1, want, h)
		}
	}
	// Long after the last ejection, the backoff starts again.
	c.advance(time.Minute)
	for range 3 {
		w.Observe(addr, 500)
	}
	if h := r.healthOf(addr); h.Until.Sub(c.Now()) != 5*time.Second {
		t.Fatalf("after a quiet minute, ejected until %v, want 5s", h.Until.Sub(c.Now()))
	}
}

func TestPassiveEjectionOff(t *testing.T) {
	r := newRecorder()
	w, _ := New(r, []string{addr}, Options{}, nil)
	for range 100 {
		w.Observe(addr, 503)
	}
	if len(r.told) != 0 {
		t.Fatalf("told %s with passive ejection off", <-r.told)
	}
}

// TestEjectionHandsOverToChecks: a passive ejection that ends while the
// host's last health check failed keeps the host out until a check passes.
func TestEjectionHandsOverToChecks(t *testing.T) {
	var status atomic.Int32
	status.Store(503)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(int(status.Load())) }))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	c := &clock{now: time.Unix(1000, 0)}
	r := newRecorder()
	w, _ := New(r, []string{host}, Options{Health: HealthCheck{Interval: time.Hour, UnhealthyThreshold: 5, HealthyThreshold: 1},
		Outlier: Outlier{ConsecutiveFailures: 3, BaseEjection: 5 * time.Second}, Now: c.Now, After: c.After}, nil)
	w.check(context.Background(), host) // one failure: not enough to eject
	if r.healthOf(host).Down {
		t.Fatal("ejected by one failed check")
	}
	for range 3 {
		w.Observe(host, 503)
	}
	c.advance(5 * time.Second)
	if h := r.healthOf(host); !h.Down || !strings.Contains(h.Reason, "health check failed") {
		t.Fatalf("after the ejection, with the last check failed: %+v", h)
	}
	status.Store(200)
	w.check(context.Background(), host)
	if h := r.healthOf(host); h.Down {
		t.Fatalf("after a passing check: %+v", h)
	}
	// Without a failed check, the ejection simply ends.
	for range 3 {
		w.Observe(host, 503)
	}
	c.advance(10 * time.Second)
	if h := r.healthOf(host); h.Down {
		t.Fatalf("after an ejection with passing checks: %+v", h)
	}
}

// TestMaxEjectionPercent: failures on every host eject at most half of them
// (at least one).
func TestMaxEjectionPercent(t *testing.T) {
	hosts := []string{"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"}
	c := &clock{now: time.Unix(1000, 0)}
	r := newRecorder()
	w, _ := New(r, hosts, Options{Outlier: Outlier{ConsecutiveFailures: 1, BaseEjection: time.Second, MaxEjectionPercent: 50},
		Now: c.Now, After: c.After}, nil)
	for _, h := range hosts {
		w.Observe(h, 503)
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
	// Once those are back, the others can be ejected.
	c.advance(time.Second)
	w.Observe(hosts[3], 503)
	if !r.healthOf(hosts[3]).Down {
		t.Fatal("a host was not ejected after the others came back")
	}
}

// TestBackoffHasNoOverflow: a base ejection time whose doubling would
// overflow stays at the maximum.
func TestBackoffHasNoOverflow(t *testing.T) {
	c := &clock{now: time.Unix(1000, 0)}
	r := newRecorder()
	w, _ := New(r, []string{addr}, Options{Outlier: Outlier{ConsecutiveFailures: 1, BaseEjection: 3 * time.Hour,
		MaxEjection: 1000 * time.Hour}, Now: c.Now, After: c.After}, nil)
	for i := range 30 {
		w.Observe(addr, 500)
		h := r.healthOf(addr)
		if d := h.Until.Sub(c.Now()); !h.Down || d < 3*time.Hour || d > 1000*time.Hour {
			t.Fatalf("ejection %d lasts %v", i+1, d)
		}
		c.advance(h.Until.Sub(c.Now()))
	}
}

// TestNoReadmissionLoggedForADownHost: when a passive ejection ends while
// the health checks hold the host down, the host is not said to be
// readmitted.
func TestNoReadmissionLoggedForADownHost(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(503) }))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	c := &clock{now: time.Unix(1000, 0)}
	var logs bytes.Buffer
	w, _ := New(newRecorder(), []string{host}, Options{Health: HealthCheck{Interval: time.Hour, UnhealthyThreshold: 1, HealthyThreshold: 1},
		Outlier: Outlier{ConsecutiveFailures: 3, BaseEjection: 5 * time.Second}, Now: c.Now, After: c.After,
		Logger: slog.New(slog.NewTextHandler(&logs, nil))}, nil)
	w.check(context.Background(), host) // down by its health check
	for range 3 {
		w.Observe(host, 503)
	}
	c.advance(5 * time.Second)
	if strings.Contains(logs.String(), "readmitted") || !strings.Contains(logs.String(), "failing health checks keep it out") {
		t.Fatalf("logs:\n%s", logs.String())
	}
}
