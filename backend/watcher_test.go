package backend

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
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

// refusingTarget is a Target that knows no host.
type refusingTarget struct{}

func (refusingTarget) SetHealth(addr string, _ picker.Health) error { return errUnknown(addr) }
func (refusingTarget) SetModels(addr string, _ []string) error      { return errUnknown(addr) }
func (refusingTarget) SetRemote(addr string, _ picker.Remote) error { return errUnknown(addr) }
func errUnknown(addr string) error                                  { return fmt.Errorf("unknown host %s", addr) }

// TestTargetRefusalsAreLogged: an update the target refuses is logged as a
// warning naming the host, and the Watcher carries on.
func TestTargetRefusalsAreLogged(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/models" {
			fmt.Fprint(w, `{"data":[{"id":"llama"}]}`)
			return
		}
		w.WriteHeader(503)
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	var logs bytes.Buffer
	c := &clock{now: time.Unix(1000, 0)}
	w, err := New(refusingTarget{}, []string{host}, Options{Outlier: Outlier{ConsecutiveFailures: 1},
		Models: Discovery{Interval: time.Hour}, Metrics: Scrape{Interval: time.Hour},
		Logger: slog.New(slog.NewTextHandler(&logs, nil)), Now: c.Now, After: c.After}, nil)
	if err != nil {
		t.Fatal(err)
	}
	w.Observe(host, 503)
	w.discover(context.Background(), host)
	w.scrape(context.Background(), host)
	for _, update := range []string{"health", "models", "remote"} {
		want := "level=WARN msg=\"target refused an update about a host\" update=" + update + " host=" + host +
			" err=\"unknown host " + host + "\""
		if !strings.Contains(logs.String(), want) {
			t.Errorf("no warning %s in:\n%s", want, logs.String())
		}
	}
}
