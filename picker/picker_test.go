package picker

import (
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func mustNew(t *testing.T, hosts []string, opts Options) *Picker {
	t.Helper()
	p, err := New(hosts, opts)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func loads(p *Picker) map[string]int64 {
	m := map[string]int64{}
	for _, h := range p.Hosts() {
		m[h.Address] = h.InFlightTokens
	}
	return m
}

func TestNewValidates(t *testing.T) {
	cases := []struct {
		hosts   []string
		wantErr string
	}{
		{nil, "no hosts"},
		{[]string{"backend:8000"}, `"backend:8000" is not a literal ip:port`},
		{[]string{"10.0.0.1"}, `"10.0.0.1" is not a literal ip:port`},
		{[]string{"10.0.0.1:0"}, "port 0"},
		{[]string{"10.0.0.1:8000", "10.0.0.1:8000"}, "duplicate host 10.0.0.1:8000"},
		{[]string{"[::ffff:10.0.0.1]:8000", "10.0.0.1:8000"}, "duplicate host 10.0.0.1:8000"},
	}
	for _, c := range cases {
		_, err := New(c.hosts, Options{})
		if err == nil || !strings.Contains(err.Error(), c.wantErr) {
			t.Errorf("New(%v) error = %v, want it to contain %q", c.hosts, err, c.wantErr)
		}
	}
	p := mustNew(t, []string{"[fd00::1]:80", "127.0.0.1:1"}, Options{})
	if got := p.Hosts()[0].Address; got != "[fd00::1]:80" {
		t.Errorf("IPv6 host = %q", got)
	}
}

func TestPickFollowsLoad(t *testing.T) {
	p := mustNew(t, []string{"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}, Options{Seed: 1})
	heavy, _ := p.Pick(4000)
	mid, _ := p.Pick(2750)
	if heavy.Host() == mid.Host() {
		t.Fatalf("second request joined the busy host %s", heavy.Host())
	}
	small, _ := p.Pick(30)
	if small.Host() == heavy.Host() || small.Host() == mid.Host() {
		t.Fatalf("small request went to a busy host %s", small.Host())
	}
	// Now 4000 / 2750 / 30: the next request goes to the 30 host.
	next, _ := p.Pick(3000)
	if next.Host() != small.Host() {
		t.Fatalf("next = %s, want least loaded %s", next.Host(), small.Host())
	}
	heavy.Release(ResponseHeaders)
	after, _ := p.Pick(10)
	if after.Host() != heavy.Host() {
		t.Fatalf("after release = %s, want the freed host %s", after.Host(), heavy.Host())
	}
}

func TestTiesAreRandom(t *testing.T) {
	hosts := []string{"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"}
	p := mustNew(t, hosts, Options{})
	counts := map[string]int{}
	for range 4000 {
		l, err := p.Pick(100)
		if err != nil {
			t.Fatal(err)
		}
		counts[l.Host()]++
		l.Release(ResponseHeaders)
	}
	for _, h := range hosts {
		// Expect 1000 each; 800 is more than 7 standard deviations away.
		if counts[h] < 800 {
			t.Errorf("host %s won %d of 4000 ties: %v", h, counts[h], counts)
		}
	}
}

func TestZeroCostPrefersFewerRequests(t *testing.T) {
	p := mustNew(t, []string{"10.0.0.1:80", "10.0.0.2:80"}, Options{Seed: 3})
	a, _ := p.Pick(0)
	b, _ := p.Pick(0)
	if a.Host() == b.Host() {
		t.Fatalf("two zero-cost requests on one host %s while another was empty", a.Host())
	}
}

// TestConcurrentPicksSpreadEvenly shows that choosing and charging are one
// step: 400 concurrent equal picks over 4 hosts, none released, must land
// exactly 100 on each. A pick that read the load and charged it later would
// pile several requests onto a host that looked idle.
func TestConcurrentPicksSpreadEvenly(t *testing.T) {
	p := mustNew(t, []string{"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"}, Options{})
	var wg sync.WaitGroup
	start := make(chan struct{})
	leases := make(chan *Lease, 400)
	for range 400 {
		wg.Go(func() {
			<-start
			l, err := p.Pick(500)
			if err != nil {
				t.Error(err)
				return
			}
			leases <- l
		})
	}
	close(start)
	wg.Wait()
	close(leases)
	for h, tok := range loads(p) {
		if tok != 100*500 {
			t.Errorf("host %s holds %d tokens, want %d", h, tok, 100*500)
		}
	}
	for l := range leases {
		l.Release(StreamEnd)
	}
	for h, tok := range loads(p) {
		if tok != 0 {
			t.Errorf("host %s holds %d tokens after every release", h, tok)
		}
	}
}

func TestReleaseExactlyOnce(t *testing.T) {
	p := mustNew(t, []string{"10.0.0.1:80"}, Options{})
	keep, _ := p.Pick(7)
	l, _ := p.Pick(1000)
	var wg sync.WaitGroup
	var mu sync.Mutex
	winners := 0
	for _, c := range []Cause{ResponseHeaders, StreamEnd, ImmediateResponse, StreamEnd} {
		wg.Go(func() {
			if l.Release(c) {
				mu.Lock()
				winners++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if winners != 1 {
		t.Fatalf("%d releases took effect, want 1", winners)
	}
	h := p.Hosts()[0]
	if h.InFlightTokens != 7 || h.InFlightRequests != 1 {
		t.Fatalf("after release: %+v, want 7 tokens and 1 request", h)
	}
	keep.Release(ResponseHeaders)
	if s := p.Stats(); s.OpenLeases != 0 {
		t.Fatalf("open leases = %d", s.OpenLeases)
	}
}

func TestCapacity(t *testing.T) {
	p := mustNew(t, []string{"10.0.0.1:80", "10.0.0.2:80"}, Options{MaxInFlightTokens: 1000})
	// A request above the cap still runs on an idle host.
	big, err := p.Pick(5000)
	if err != nil {
		t.Fatalf("oversized request on an idle host: %v", err)
	}
	mid, err := p.Pick(600)
	if err != nil || mid.Host() == big.Host() {
		t.Fatalf("Pick(600) = %v, %v", mid, err)
	}
	if _, err := p.Pick(600); err != ErrNoCapacity {
		t.Fatalf("Pick over capacity error = %v, want ErrNoCapacity", err)
	}
	if l, err := p.Pick(400); err != nil || l.Host() != mid.Host() {
		t.Fatalf("Pick(400) within the cap = %v, %v", l, err)
	}
	if got := p.Stats().RejectedPicks; got != 1 {
		t.Fatalf("rejected picks = %d, want 1", got)
	}
}

func TestSweep(t *testing.T) {
	now := time.Unix(1000, 0)
	p := mustNew(t, []string{"10.0.0.1:80"}, Options{Now: func() time.Time { return now }})
	old, _ := p.Pick(300)
	now = now.Add(10 * time.Minute)
	young, _ := p.Pick(20)
	n, tok := p.Sweep(5 * time.Minute)
	if n != 1 || tok != 300 {
		t.Fatalf("Sweep = %d leases, %d tokens; want 1, 300", n, tok)
	}
	if old.Release(ResponseHeaders) {
		t.Fatal("a swept lease released twice")
	}
	if got := p.Hosts()[0].InFlightTokens; got != 20 {
		t.Fatalf("in flight = %d, want 20", got)
	}
	young.Release(ResponseHeaders)
	s := p.Stats()
	if s.SweptTokens != 300 || s.Releases[Swept] != 1 || s.Releases[ResponseHeaders] != 1 {
		t.Fatalf("stats = %+v", s)
	}
}

func TestCollector(t *testing.T) {
	p := mustNew(t, []string{"10.0.0.1:80"}, Options{})
	l, _ := p.Pick(42)
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(p.Collector())
	want := `
# HELP tokenlb_host_in_flight_tokens Prompt tokens charged to a host and not yet released.
# TYPE tokenlb_host_in_flight_tokens gauge
tokenlb_host_in_flight_tokens{host="10.0.0.1:80"} 42
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "tokenlb_host_in_flight_tokens"); err != nil {
		t.Fatal(err)
	}
	l.Release(StreamEnd)
	want = `
# HELP tokenlb_host_in_flight_tokens Prompt tokens charged to a host and not yet released.
# TYPE tokenlb_host_in_flight_tokens gauge
tokenlb_host_in_flight_tokens{host="10.0.0.1:80"} 0
# HELP tokenlb_releases_total Leases released, by what released them.
# TYPE tokenlb_releases_total counter
tokenlb_releases_total{cause="immediate_response"} 0
tokenlb_releases_total{cause="response_end"} 0
tokenlb_releases_total{cause="response_headers"} 0
tokenlb_releases_total{cause="stream_end"} 1
tokenlb_releases_total{cause="swept"} 0
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "tokenlb_host_in_flight_tokens", "tokenlb_releases_total"); err != nil {
		t.Fatal(err)
	}
}

// TestRunSweeper checks that the periodic sweeper reclaims a forgotten lease
// and leaves a young one alone.
func TestRunSweeper(t *testing.T) {
	var mu sync.Mutex
	now := time.Unix(1000, 0)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	p := mustNew(t, []string{"10.0.0.1:80"}, Options{Now: clock})
	p.Pick(300) // forgotten
	mu.Lock()
	now = now.Add(2 * time.Hour)
	mu.Unlock()
	young, _ := p.Pick(20)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { p.RunSweeper(stop, time.Millisecond, time.Hour); close(done) }()
	deadline := time.Now().Add(10 * time.Second)
	for p.Stats().SweptTokens != 300 {
		if time.Now().After(deadline) {
			t.Fatal("sweeper did not reclaim the forgotten lease")
		}
		time.Sleep(time.Millisecond)
	}
	close(stop)
	<-done
	if got := p.Hosts()[0].InFlightTokens; got != 20 {
		t.Fatalf("in flight after sweep = %d, want 20", got)
	}
	young.Release(ResponseHeaders)
}
