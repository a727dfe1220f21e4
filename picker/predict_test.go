package picker

import (
	"testing"
	"time"
)

// TestPredictedWait: a cost that predicts each host's time to first token
// is scored on its prediction plus what it adds to the ledger, not on the
// ledger's load: a host with more load but a shorter predicted wait wins.
func TestPredictedWait(t *testing.T) {
	hosts := []string{"10.0.0.1:80", "10.0.0.2:80"}
	p := mustNew(t, hosts, Options{})
	// Load 1,000 on host 1.
	heavy, _ := p.Pick(Request{Cost: func(hs HostState) Charge {
		if hs.Addr == hosts[0] {
			return Charge{UntilEnd: 1000}
		}
		return Charge{UntilEnd: 1e6}
	}})
	if heavy.Host() != hosts[0] {
		t.Fatalf("set-up request went to %s", heavy.Host())
	}
	// Host 1 is predicted to answer in 50, host 2 (idle) in 500.
	waits := map[string]int64{hosts[0]: 50, hosts[1]: 500}
	l, _ := p.Pick(Request{Cost: func(hs HostState) Charge { return Charge{Wait: waits[hs.Addr], UntilEnd: 10} }})
	if l.Host() != hosts[0] {
		t.Fatalf("went to %s, want %s, predicted to answer first", l.Host(), hosts[0])
	}
	if l.Charge().Wait != 50 {
		t.Fatalf("lease charge %+v, want the prediction kept", l.Charge())
	}
}

// TestSpread: hosts whose scores are closer than Spread (relative to the
// lowest) count as tied, and a tie goes to the fewest in-flight requests;
// without it the lowest score wins.
func TestSpread(t *testing.T) {
	hosts := []string{"10.0.0.1:80", "10.0.0.2:80"}
	for _, tc := range []struct {
		spread float64
		want   string
	}{{0, hosts[0]}, {0.5, hosts[1]}} {
		p := mustNew(t, hosts, Options{Tolerance: DefaultTolerance})
		// Two small requests on host 1, none on host 2.
		for range 2 {
			p.Pick(Request{Cost: func(hs HostState) Charge {
				if hs.Addr == hosts[0] {
					return Charge{UntilEnd: 1}
				}
				return Charge{UntilEnd: 1000}
			}})
		}
		// Host 2 is predicted 30% slower than host 1.
		waits := map[string]int64{hosts[0]: 1000, hosts[1]: 1300}
		l, _ := p.Pick(Request{Spread: tc.spread, Cost: func(hs HostState) Charge { return Charge{Wait: waits[hs.Addr], UntilEnd: 1} }})
		if l.Host() != tc.want {
			t.Errorf("spread %v: went to %s, want %s", tc.spread, l.Host(), tc.want)
		}
	}
}

// TestHostState: a cost sees each host's ledger: its requests, those
// decoding, the prompt tokens still prefilling, its load and the decode
// time of its requests in flight, which the releases return.
func TestHostState(t *testing.T) {
	p := mustNew(t, []string{"10.0.0.1:80"}, Options{})
	var seen []HostState
	cost := func(hs HostState) Charge {
		seen = append(seen, hs)
		return Charge{Tokens: 100, UntilFirstToken: 70, UntilEnd: 30, Decode: 500, Uncached: 60}
	}
	a, _ := p.Pick(Request{Cost: cost})
	a.FirstToken()
	b, _ := p.Pick(Request{Cost: cost})
	want := HostState{Addr: "10.0.0.1:80", Requests: 1, Decoding: 1, Load: 30, Decode: 500}
	if seen[1] != want || b.State() != want {
		t.Fatalf("second request saw %+v (lease %+v), want %+v", seen[1], b.State(), want)
	}
	p.Pick(Request{Cost: cost})
	want = HostState{Addr: "10.0.0.1:80", Requests: 2, Decoding: 1, PrefillingTokens: 100, Uncached: 60, Load: 130, Decode: 1000}
	if seen[2] != want {
		t.Fatalf("third request saw %+v, want %+v", seen[2], want)
	}
	a.Release(ResponseEnd)
	p.Pick(Request{Cost: cost})
	want = HostState{Addr: "10.0.0.1:80", Requests: 2, PrefillingTokens: 200, Uncached: 120, Load: 200, Decode: 1000}
	if seen[3] != want {
		t.Fatalf("after a release, the fourth saw %+v, want %+v", seen[3], want)
	}
}

// TestPrefixShare: with prefix affinity, a cost sees which share of the
// prompt each host recently served as a prefix.
func TestPrefixShare(t *testing.T) {
	hosts := []string{"10.0.0.1:80", "10.0.0.2:80"}
	p := mustNew(t, hosts, Options{Affinity: Affinity{MaxExtraLoad: 1000, TTL: time.Hour}})
	doc := []uint64{1, 2, 3, 4}
	first, _ := p.Pick(Request{Cost: Tokens(10), Prefix: doc[:2], PrefixBlockBytes: 100, PromptBytes: 200})
	shares := map[string]float64{}
	p.Pick(Request{Prefix: doc, PrefixBlockBytes: 100, PromptBytes: 1000, Cost: func(hs HostState) Charge {
		shares[hs.Addr] = hs.PrefixShare
		return Charge{Tokens: 10}
	}})
	other := hosts[0]
	if first.Host() == other {
		other = hosts[1]
	}
	// The first host served 2 of the 4 blocks of 100 bytes, of 1,000.
	if shares[first.Host()] != 0.2 || shares[other] != 0 {
		t.Fatalf("prefix shares %v, want 0.2 on %s and 0 on %s", shares, first.Host(), other)
	}
}
