package discovery

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestFile: a change of the file or a reload request reads it; only a set
// that differs from the last is reported; a failed read is counted and
// reports nothing.
func TestFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "hosts")
	if err := os.WriteFile(path, []byte("a"), 0o600); err != nil {
		t.Fatal(err)
	}
	type result struct {
		eps []Endpoint
		err error
	}
	var next atomic.Value // result
	next.Store(result{eps: []Endpoint{{Address: "10.0.0.1:80"}}})
	reload := make(chan os.Signal, 1)
	errs := prometheus.NewCounter(prometheus.CounterOpts{Name: "errors_total"})
	f := &File{Path: path, Interval: 5 * time.Millisecond, Reload: reload, Errors: errs, Load: func() ([]Endpoint, error) {
		r := next.Load().(result)
		return r.eps, r.err
	}}
	updates := make(chan []Endpoint, 10)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go f.Run(ctx, []Endpoint{{Address: "10.0.0.1:80"}}, func(e []Endpoint) { updates <- e })

	touch := func(at time.Time) {
		t.Helper()
		if err := os.Chtimes(path, at, at); err != nil {
			t.Fatal(err)
		}
	}
	// A change with the same set: nothing reported. Then a new set.
	next.Store(result{eps: []Endpoint{{Address: "10.0.0.1:80"}}})
	touch(time.Unix(1000, 0))
	next.Store(result{eps: []Endpoint{{Address: "10.0.0.2:80", Models: []string{"m"}}}})
	touch(time.Unix(2000, 0))
	select {
	case got := <-updates:
		if len(got) != 1 || got[0].Address != "10.0.0.2:80" {
			t.Fatalf("reported %v", got)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a changed file was not read")
	}
	// A failed read: counted, nothing reported.
	next.Store(result{err: errors.New("hosts[0].address: bad")})
	reload <- os.Interrupt
	deadline := time.Now().Add(10 * time.Second)
	for testutil.ToFloat64(errs) != 1 {
		if time.Now().After(deadline) {
			t.Fatal("the failed read was not counted")
		}
		time.Sleep(time.Millisecond)
	}
	// A reload request with the file unchanged reads it.
	next.Store(result{eps: []Endpoint{{Address: "10.0.0.3:80"}}})
	reload <- os.Interrupt
	select {
	case got := <-updates:
		if len(got) != 1 || got[0].Address != "10.0.0.3:80" {
			t.Fatalf("reported %v", got)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a reload request was not served")
	}
	if len(updates) != 0 {
		t.Fatalf("more reports: %v", <-updates)
	}
}
