package backend

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// countingHost is a backend on loopback that counts its model-list reads
// and serves one model.
func countingHost(t *testing.T) (addr string, reads *atomic.Int64) {
	t.Helper()
	reads = new(atomic.Int64)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reads.Add(1)
		w.Write([]byte(`{"object":"list","data":[{"id":"m","object":"model"}]}`))
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://"), reads
}

// TestSetHosts: while Run runs, a host added is read at once; a removed one
// is no longer contacted and its metrics go.
func TestSetHosts(t *testing.T) {
	first, firstReads := countingHost(t)
	second, secondReads := countingHost(t)
	rec := newRecorder()
	m := NewMetrics()
	w, err := New(rec, []string{first}, Options{Models: Discovery{Interval: 20 * time.Millisecond}}, m)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { w.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	<-w.Ready()

	if err := w.SetHosts([]string{second}, nil); err != nil {
		t.Fatal(err)
	}
	rec.await(t, "the added host's models", func(s string) bool { return s == "models "+second })
	// The removed host's poller has stopped: after it, reads of the
	// second host go on while the first's count stays put.
	stopped := firstReads.Load()
	from := secondReads.Load()
	for secondReads.Load() < from+3 {
		rec.await(t, "more reads of the added host", func(s string) bool { return s == "models "+second })
	}
	if got := firstReads.Load(); got > stopped+1 { // one read may have been under way
		t.Fatalf("the removed host was read %d more times", got-stopped)
	}
	if n := testutil.CollectAndCount(m.healthy); n != 1 {
		t.Fatalf("%d tokenlb_host_healthy series, want the remaining host's only", n)
	}
	// Hosts added with their models configured are not asked for them.
	third, thirdReads := countingHost(t)
	fourth, fourthReads := countingHost(t)
	if err := w.SetHosts([]string{second, third, fourth}, []string{third}); err != nil {
		t.Fatal(err)
	}
	for fourthReads.Load() < 3 {
		rec.await(t, "reads of the added host", func(s string) bool { return s == "models "+fourth })
	}
	if n := thirdReads.Load(); n != 0 {
		t.Fatalf("a host with configured models was asked %d times", n)
	}
	if err := w.SetHosts([]string{"backend:80"}, nil); err == nil {
		t.Fatal("a host name was accepted")
	}
}
