package backend

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenlb/tokenlb/picker"
)

// recorder is a Target that keeps what it is told.
type recorder struct {
	mu     sync.Mutex
	health map[string]picker.Health
	models map[string][]string
	remote map[string]picker.Remote
	told   chan string // "health <addr>", "models <addr>", "remote <addr>"
}

func newRecorder() *recorder {
	return &recorder{health: map[string]picker.Health{}, models: map[string][]string{}, remote: map[string]picker.Remote{},
		told: make(chan string, 1000)}
}

func (r *recorder) SetHealth(addr string, h picker.Health) error {
	r.mu.Lock()
	r.health[addr] = h
	r.mu.Unlock()
	r.told <- "health " + addr
	return nil
}

func (r *recorder) SetModels(addr string, m []string) error {
	r.mu.Lock()
	r.models[addr] = m
	r.mu.Unlock()
	r.told <- "models " + addr
	return nil
}

func (r *recorder) SetRemote(addr string, rem picker.Remote) error {
	r.mu.Lock()
	r.remote[addr] = rem
	r.mu.Unlock()
	r.told <- "remote " + addr
	return nil
}

// await reads what the target is told until cond holds, failing after 5 s.
func (r *recorder) await(t *testing.T, what string, cond func(string) bool) {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case got := <-r.told:
			if cond(got) {
				return
			}
		case <-timeout:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func (r *recorder) healthOf(addr string) picker.Health {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.health[addr]
}

// clock is a manual clock whose After runs f when the clock passes d.
type clock struct {
	mu     sync.Mutex
	now    time.Time
	timers []timer
}

type timer struct {
	at      time.Time
	f       func()
	stopped *atomic.Bool
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) After(d time.Duration, f func()) func() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := &atomic.Bool{}
	c.timers = append(c.timers, timer{c.now.Add(d), f, s})
	return func() bool { return !s.Swap(true) }
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	var due []func()
	kept := c.timers[:0]
	for _, t := range c.timers {
		if !t.at.After(c.now) {
			if !t.stopped.Swap(true) {
				due = append(due, t.f)
			}
		} else {
			kept = append(kept, t)
		}
	}
	c.timers = kept
	c.mu.Unlock()
	for _, f := range due {
		f()
	}
}

const addr = "10.0.0.1:8000"

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

func TestDiscoveryAndScrape(t *testing.T) {
	var models atomic.Value
	models.Store(`{"object":"list","data":[{"id":"llama","object":"model"},{"id":"llama-lora","object":"model"}]}`)
	page := `# HELP vllm:num_requests_running Requests in the running batch.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 7.0
vllm:num_requests_running{engine="1",model_name="llama"} 2.0
vllm:num_requests_waiting{engine="0",model_name="l{l}a \"m\" a"} 3.0
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.75
vllm:num_requests_running_total 99
`
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/models":
			fmt.Fprint(w, models.Load())
		case "/metrics":
			fmt.Fprint(w, page)
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	r := newRecorder()
	w, _ := New(r, []string{host}, Options{Models: Discovery{Interval: time.Hour}, Metrics: Scrape{Interval: time.Hour}}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { w.Run(ctx); close(done) }()
	<-r.told
	<-r.told
	cancel()
	<-done
	if got := strings.Join(r.models[host], ","); got != "llama,llama-lora" {
		t.Errorf("models %q", got)
	}
	rem := r.remote[host]
	if rem.Running != 9 || rem.Waiting != 3 || rem.KVCacheUsage != 0.75 || rem.At.IsZero() {
		t.Errorf("remote %+v, want 9 running, 3 waiting, 0.75 usage", rem)
	}
}

func TestParseMetrics(t *testing.T) {
	for _, tc := range []struct {
		name, page string
		want       picker.Remote
		found      bool
	}{
		{"sglang", "sglang:num_running_reqs{model_name=\"q\"} 4\nsglang:num_queue_reqs{model_name=\"q\"} 1\nsglang:token_usage 0.25\n",
			picker.Remote{Running: 4, Waiting: 1, KVCacheUsage: 0.25}, true},
		{"old vllm", "vllm:num_requests_running 1\nvllm:gpu_cache_usage_perc 0.9\n", picker.Remote{Running: 1, KVCacheUsage: 0.9}, true},
		{"nothing", "go_goroutines 12\n", picker.Remote{}, false},
		{"garbage", "vllm:num_requests_running{\nvllm:num_requests_waiting NaN\nvllm:num_requests_waiting -3\nvllm:num_requests_waiting 2 1700000000\n",
			picker.Remote{Waiting: 2}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, found, err := parseMetrics(strings.NewReader(tc.page))
			if err != nil || got != tc.want || found != tc.found {
				t.Fatalf("parseMetrics = %+v, %v, %v; want %+v, %v", got, found, err, tc.want, tc.found)
			}
		})
	}
}

func TestFailedReads(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, `{"not":"a list"}`)
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	r := newRecorder()
	w, _ := New(r, []string{host}, Options{Models: Discovery{Interval: time.Hour}, Metrics: Scrape{Interval: time.Hour}}, nil)
	w.discover(context.Background(), host)
	w.scrape(context.Background(), host)
	// A bad model list leaves the models as they were (not known: any
	// model); a bad metrics page forgets the last report.
	if _, told := r.models[host]; told {
		t.Errorf("a bad model list was passed on: %v", r.models[host])
	}
	if rem, told := r.remote[host]; !told || !rem.At.IsZero() {
		t.Errorf("a bad metrics page left %+v", rem)
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

// TestModelsReadWhenHostRecovers: an engine that was loading (failing its
// health checks and its model list) is asked for its models as soon as it
// passes its checks, not a discovery interval later.
func TestModelsReadWhenHostRecovers(t *testing.T) {
	var up atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !up.Load() {
			w.WriteHeader(503)
			return
		}
		if r.URL.Path == "/v1/models" {
			fmt.Fprint(w, `{"data":[{"id":"llama"}]}`)
		}
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	r := newRecorder()
	w, _ := New(r, []string{host}, Options{Health: HealthCheck{Interval: 5 * time.Millisecond, UnhealthyThreshold: 1, HealthyThreshold: 1},
		Models: Discovery{Interval: time.Hour}}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { w.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	<-w.Ready()
	r.await(t, "the host down", func(got string) bool { return got == "health "+host && r.healthOf(host).Down })
	up.Store(true)
	r.await(t, "the models read", func(got string) bool { return got == "models "+host })
	r.mu.Lock()
	defer r.mu.Unlock()
	if m := r.models[host]; len(m) != 1 || m[0] != "llama" {
		t.Fatalf("models %v", m)
	}
}
