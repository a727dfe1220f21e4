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
	heavy, _ := p.Pick(Request{Cost: Tokens(4000)})
	mid, _ := p.Pick(Request{Cost: Tokens(2750)})
	if heavy.Host() == mid.Host() {
		t.Fatalf("second request joined the busy host %s", heavy.Host())
	}
	small, _ := p.Pick(Request{Cost: Tokens(30)})
	if small.Host() == heavy.Host() || small.Host() == mid.Host() {
		t.Fatalf("small request went to a busy host %s", small.Host())
	}
	// Now 4000 / 2750 / 30: the next request goes to the 30 host.
	next, _ := p.Pick(Request{Cost: Tokens(3000)})
	if next.Host() != small.Host() {
		t.Fatalf("next = %s, want least loaded %s", next.Host(), small.Host())
	}
	heavy.Release(ResponseHeaders)
	after, _ := p.Pick(Request{Cost: Tokens(10)})
	if after.Host() != heavy.Host() {
		t.Fatalf("after release = %s, want the freed host %s", after.Host(), heavy.Host())
	}
}

func TestTiesAreRandom(t *testing.T) {
	hosts := []string{"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"}
	p := mustNew(t, hosts, Options{})
	counts := map[string]int{}
	for range 4000 {
		l, err := p.Pick(Request{Cost: Tokens(100)})
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
	a, _ := p.Pick(Request{Cost: Tokens(0)})
	b, _ := p.Pick(Request{Cost: Tokens(0)})
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
			l, err := p.Pick(Request{Cost: Tokens(500)})
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
	keep, _ := p.Pick(Request{Cost: Tokens(7)})
	l, _ := p.Pick(Request{Cost: Tokens(1000)})
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
	big, err := p.Pick(Request{Cost: Tokens(5000)})
	if err != nil {
		t.Fatalf("oversized request on an idle host: %v", err)
	}
	mid, err := p.Pick(Request{Cost: Tokens(600)})
	if err != nil || mid.Host() == big.Host() {
		t.Fatalf("Pick(600) = %v, %v", mid, err)
	}
	if _, err := p.Pick(Request{Cost: Tokens(600)}); err != ErrNoCapacity {
		t.Fatalf("Pick over capacity error = %v, want ErrNoCapacity", err)
	}
	if l, err := p.Pick(Request{Cost: Tokens(400)}); err != nil || l.Host() != mid.Host() {
		t.Fatalf("Pick(400) within the cap = %v, %v", l, err)
	}
	if got := p.Stats().RejectedPicks; got != 1 {
		t.Fatalf("rejected picks = %d, want 1", got)
	}
}

func TestSweep(t *testing.T) {
	now := time.Unix(1000, 0)
	p := mustNew(t, []string{"10.0.0.1:80"}, Options{Now: func() time.Time { return now }})
	old, _ := p.Pick(Request{Cost: Tokens(300)})
	now = now.Add(10 * time.Minute)
	young, _ := p.Pick(Request{Cost: Tokens(20)})
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
	l, _ := p.Pick(Request{Cost: Tokens(42)})
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(p.Collector(ResponseHeaders, ResponseEnd, StreamEnd, ImmediateResponse))
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
	p.Pick(Request{Cost: Tokens(300)}) // forgotten
	mu.Lock()
	now = now.Add(2 * time.Hour)
	mu.Unlock()
	young, _ := p.Pick(Request{Cost: Tokens(20)})
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

// TestTwoPhaseRelease: FirstToken releases the prefill part once; Release
// releases the rest once, whichever order they come in.
func TestTwoPhaseRelease(t *testing.T) {
	p := mustNew(t, []string{"10.0.0.1:80"}, Options{})
	two := func(HostState) Charge { return Charge{Tokens: 100, UntilFirstToken: 700, UntilEnd: 300} }
	load := func() HostLoad { return p.Hosts()[0] }

	l, _ := p.Pick(Request{Cost: two})
	if h := load(); h.Load != 1000 || h.PrefillingTokens != 100 || h.InFlightTokens != 100 {
		t.Fatalf("after pick: %+v", h)
	}
	if !l.FirstToken() || l.FirstToken() {
		t.Fatal("FirstToken should take effect exactly once")
	}
	if h := load(); h.Load != 300 || h.PrefillingTokens != 0 || h.InFlightTokens != 100 || h.InFlightRequests != 1 {
		t.Fatalf("after first token: %+v", h)
	}
	if !l.Release(ResponseEnd) || l.Release(StreamEnd) {
		t.Fatal("Release should take effect exactly once")
	}
	if h := load(); h.Load != 0 || h.InFlightTokens != 0 || h.InFlightRequests != 0 {
		t.Fatalf("after release: %+v", h)
	}

	// An abort before the first token releases both parts; a late
	// FirstToken does nothing.
	l, _ = p.Pick(Request{Cost: two})
	l.Release(StreamEnd)
	if l.FirstToken() {
		t.Fatal("FirstToken after Release took effect")
	}
	if h := load(); h.Load != 0 || h.PrefillingTokens != 0 || h.InFlightTokens != 0 {
		t.Fatalf("after abort: %+v", h)
	}
}

// TestAhead: a lease records the prompt tokens still waiting for their first
// token on its host.
func TestAhead(t *testing.T) {
	p := mustNew(t, []string{"10.0.0.1:80"}, Options{})
	a, _ := p.Pick(Request{Cost: Tokens(500)})
	b, _ := p.Pick(Request{Cost: Tokens(200)})
	a.FirstToken()
	c, _ := p.Pick(Request{Cost: Tokens(50)})
	if a.Ahead() != 0 || b.Ahead() != 500 || c.Ahead() != 200 {
		t.Fatalf("ahead %d, %d, %d; want 0, 500, 200", a.Ahead(), b.Ahead(), c.Ahead())
	}
}

// TestCostPerHost: the pick minimises load after adding the request's cost
// on each host, so an idle slow host loses to an idle fast one, and a busy
// fast host to an idle slow one.
func TestCostPerHost(t *testing.T) {
	p := mustNew(t, []string{"10.0.0.1:80", "10.0.0.2:80"}, Options{Tolerance: DefaultTolerance})
	slow := func(hs HostState) Charge {
		h := hs.Addr
		if h == "10.0.0.2:80" {
			return Charge{UntilEnd: 200}
		}
		return Charge{UntilEnd: 100}
	}
	for range 20 {
		l, _ := p.Pick(Request{Cost: slow})
		if l.Host() != "10.0.0.1:80" {
			t.Fatal("idle slow host picked over an idle fast one")
		}
		l.Release(ResponseEnd)
	}
	busy, _ := p.Pick(Request{Cost: Tokens(150)}) // lands on .1 or .2 (tied at 150)
	other := map[string]string{"10.0.0.1:80": "10.0.0.2:80", "10.0.0.2:80": "10.0.0.1:80"}[busy.Host()]
	if l, _ := p.Pick(Request{Cost: slow}); l.Host() != other {
		t.Fatalf("picked %s carrying 150 over %s", l.Host(), other)
	}
}

// TestToleranceSpreadsNearTies: costs a few percent apart count as tied, so
// idle hosts share the work; with no tolerance the cheaper host takes all.
func TestToleranceSpreadsNearTies(t *testing.T) {
	near := func(hs HostState) Charge {
		h := hs.Addr
		if h == "10.0.0.2:80" {
			return Charge{UntilEnd: 1030}
		}
		return Charge{UntilEnd: 1000}
	}
	for _, tc := range []struct {
		tol   float64
		hosts int
	}{{0, 1}, {DefaultTolerance, 2}} {
		p := mustNew(t, []string{"10.0.0.1:80", "10.0.0.2:80"}, Options{Tolerance: tc.tol, Seed: 1})
		seen := map[string]bool{}
		for range 50 {
			l, _ := p.Pick(Request{Cost: near})
			seen[l.Host()] = true
			l.Release(ResponseEnd)
		}
		if len(seen) != tc.hosts {
			t.Errorf("tolerance %v: %d hosts used, want %d", tc.tol, len(seen), tc.hosts)
		}
	}
}

// TestStallWeight: with a stall weight, a long prompt avoids the host whose
// requests are decoding, since its prefill would stall them; a request with
// no prefill part is not affected.
func TestStallWeight(t *testing.T) {
	for _, tc := range []struct {
		weight float64
		want   string
	}{{0, "10.0.0.1:80"}, {1, "10.0.0.2:80"}} {
		p := mustNew(t, []string{"10.0.0.1:80", "10.0.0.2:80"}, Options{StallWeight: tc.weight})
		// .1: two decoding requests holding 100 each; .2: one request
		// still prefilling, holding 300.
		for range 2 {
			l, _ := p.Pick(Request{Cost: func(hs HostState) Charge {
				h := hs.Addr
				if h == "10.0.0.1:80" {
					return Charge{UntilEnd: 100}
				}
				return Charge{UntilEnd: 1000}
			}})
			l.FirstToken()
		}
		p.Pick(Request{Cost: func(hs HostState) Charge {
			h := hs.Addr
			if h == "10.0.0.2:80" {
				return Charge{UntilFirstToken: 300}
			}
			return Charge{UntilFirstToken: 1000}
		}})
		if h := p.Hosts(); h[0].DecodingRequests != 2 || h[1].DecodingRequests != 0 {
			t.Fatalf("decoding requests %d, %d; want 2, 0", h[0].DecodingRequests, h[1].DecodingRequests)
		}
		// A 150 prefill: .1 scores 200 + 150 (+ 2 × 150 × weight), .2 300 + 150.
		l, _ := p.Pick(Request{Cost: func(HostState) Charge { return Charge{UntilFirstToken: 150} }})
		if l.Host() != tc.want {
			t.Errorf("stall weight %v: picked %s, want %s", tc.weight, l.Host(), tc.want)
		}
	}
}
