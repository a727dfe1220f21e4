package picker

import (
	"errors"
	"slices"
	"sync"
	"testing"
	"time"
)

func addrs(p *Picker) (live, removed []string) {
	for _, h := range p.Hosts() {
		if h.Removed {
			removed = append(removed, h.Address)
		} else {
			live = append(live, h.Address)
		}
	}
	return live, removed
}

// TestSetHosts: a new host is routable at once; a removed one gets no new
// pick, stays listed (removed) while its request is in flight, releases it
// exactly once and then goes; an invalid list changes nothing.
func TestSetHosts(t *testing.T) {
	p := mustNew(t, []string{"10.0.0.1:80", "10.0.0.2:80"}, Options{Seed: 1})
	a, _ := p.Pick(Request{Cost: Tokens(1000)})
	b, _ := p.Pick(Request{Cost: Tokens(1000)})
	if a.Host() == b.Host() {
		t.Fatal("both on one host")
	}

	added, removed, err := p.SetHosts([]string{"10.0.0.2:80", "10.0.0.3:80"})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(added, []string{"10.0.0.3:80"}) || !slices.Equal(removed, []string{"10.0.0.1:80"}) {
		t.Fatalf("added %v, removed %v", added, removed)
	}
	// The new host is idle: the next pick goes there.
	if l, _ := p.Pick(Request{Cost: Tokens(10)}); l.Host() != "10.0.0.3:80" {
		t.Fatalf("next pick on %s, want the new host", l.Host())
	}
	live, gone := addrs(p)
	if !slices.Equal(live, []string{"10.0.0.2:80", "10.0.0.3:80"}) || !slices.Equal(gone, []string{"10.0.0.1:80"}) {
		t.Fatalf("hosts %v, removed %v", live, gone)
	}
	// No pick reaches the removed host, however loaded the others.
	for range 20 {
		if l, _ := p.Pick(Request{Cost: Tokens(5000)}); l.Host() == "10.0.0.1:80" {
			t.Fatal("a removed host was picked")
		}
	}
	// Its request in flight releases once, and then it is gone.
	old := a
	if old.Host() != "10.0.0.1:80" {
		old = b
	}
	if !old.Release(ResponseEnd) || old.Release(ResponseEnd) {
		t.Fatal("the removed host's lease did not release exactly once")
	}
	if _, gone := addrs(p); len(gone) != 0 {
		t.Fatalf("still listed after its last request: %v", gone)
	}
	if err := p.SetHealth("10.0.0.1:80", Health{Down: true}); err == nil {
		t.Fatal("a removed host still takes health reports")
	}

	for _, bad := range [][]string{nil, {"10.0.0.2:80", "10.0.0.2:80"}, {"backend:80"}} {
		if _, _, err := p.SetHosts(bad); err == nil {
			t.Fatalf("SetHosts(%v) accepted", bad)
		}
	}
	if live, _ := addrs(p); !slices.Equal(live, []string{"10.0.0.2:80", "10.0.0.3:80"}) {
		t.Fatalf("an invalid list changed the fleet: %v", live)
	}
}

// TestReaddedWhileDraining: a host removed and added back before its
// requests ended rejoins with them on its ledger.
func TestReaddedWhileDraining(t *testing.T) {
	p := mustNew(t, []string{"10.0.0.1:80"}, Options{})
	l, _ := p.Pick(Request{Cost: Tokens(700)})
	if _, _, err := p.SetHosts([]string{"10.0.0.2:80"}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := p.SetHosts([]string{"10.0.0.2:80", "10.0.0.1:80"}); err != nil {
		t.Fatal(err)
	}
	if got := loads(p); got["10.0.0.1:80"] != 700 || len(p.Hosts()) != 2 {
		t.Fatalf("ledger after re-adding %v (%d hosts)", got, len(p.Hosts()))
	}
	l.Release(ResponseEnd)
	if got := loads(p); got["10.0.0.1:80"] != 0 {
		t.Fatalf("after the release %v", got)
	}
}

// TestRemovedHostsPrefixesForgotten: a host that takes a removed host's
// place in the prefix table does not inherit what it served.
func TestRemovedHostsPrefixesForgotten(t *testing.T) {
	now := time.Unix(1000, 0)
	p := mustNew(t, []string{"10.0.0.1:80", "10.0.0.2:80"}, Options{Seed: 1, Now: func() time.Time { return now },
		Affinity: Affinity{MaxExtraLoad: 500, TTL: time.Minute}})
	prefill := func(HostState) Charge { return Charge{Tokens: 100, UntilFirstToken: 1000} }
	doc := []uint64{21, 22, 23}
	first, _ := p.Pick(Request{Cost: prefill, Prefix: doc})
	first.Release(ResponseEnd)
	others := []string{"10.0.0.1:80", "10.0.0.2:80"}
	others = slices.DeleteFunc(others, func(a string) bool { return a == first.Host() })
	// The host that served the document leaves; a new one takes its index.
	if _, _, err := p.SetHosts([]string{others[0], "10.0.0.9:80"}); err != nil {
		t.Fatal(err)
	}
	l, _ := p.Pick(Request{Cost: prefill, Prefix: doc})
	l.Release(ResponseEnd)
	if got := p.Stats().Affinity[AffinityHit]; got != 0 {
		t.Fatalf("the new host inherited the removed host's prefix: %d hits", got)
	}
}

// TestSetHostsConcurrent: picks and releases racing with membership changes
// leave every ledger at 0 and release every lease once (run with -race).
func TestSetHostsConcurrent(t *testing.T) {
	sets := [][]string{{"10.0.0.1:80", "10.0.0.2:80"}, {"10.0.0.2:80", "10.0.0.3:80"}, {"10.0.0.3:80", "10.0.0.1:80", "10.0.0.4:80"}}
	p := mustNew(t, sets[0], Options{})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := range 500 {
				l, err := p.Pick(Request{Cost: Tokens(int64(10 + i%50))})
				if err != nil {
					t.Error(err)
					return
				}
				if i%3 == w%3 {
					l.FirstToken()
				}
				l.Release(ResponseEnd)
			}
		})
	}
	wg.Go(func() {
		for i := range 300 {
			if _, _, err := p.SetHosts(sets[i%len(sets)]); err != nil {
				t.Error(err)
			}
		}
	})
	wg.Wait()
	for _, h := range p.Hosts() {
		if h.InFlightTokens != 0 || h.InFlightRequests != 0 || h.Load != 0 || h.Removed {
			t.Fatalf("after the race: %+v", h)
		}
	}
	s := p.Stats()
	if s.OpenLeases != 0 || s.Releases[ResponseEnd] != 2000 {
		t.Fatalf("open leases %d, releases %v", s.OpenLeases, s.Releases)
	}
	if live, _ := addrs(p); !slices.Equal(live, sets[299%len(sets)]) {
		t.Fatalf("hosts after the last change %v, want %v", live, sets[299%len(sets)])
	}
}

// TestSubset: a subset hint restricts the pick to its hosts, whatever
// their load and in any address form; one that names no eligible host is
// refused and counted.
func TestSubset(t *testing.T) {
	p := mustNew(t, []string{"10.0.0.1:80", "10.0.0.2:80", "[fd00::1]:80"}, Options{Seed: 1})
	busy, _ := p.Pick(Request{Cost: Tokens(5000), Subset: []string{"10.0.0.2:80"}})
	if busy.Host() != "10.0.0.2:80" {
		t.Fatalf("picked %s outside the subset", busy.Host())
	}
	for range 5 {
		l, err := p.Pick(Request{Cost: Tokens(10), Subset: []string{" 10.0.0.2:80", "[fd00:0::1]:80"}})
		if err != nil {
			t.Fatal(err)
		}
		if l.Host() == "10.0.0.1:80" {
			t.Fatal("picked outside the subset")
		}
		l.Release(ResponseEnd)
	}
	for _, subset := range [][]string{{}, {"10.9.9.9:80"}, {"not an address"}} {
		if _, err := p.Pick(Request{Cost: Tokens(10), Subset: subset}); !errors.Is(err, ErrNotInSubset) {
			t.Fatalf("subset %v: %v, want ErrNotInSubset", subset, err)
		}
	}
	if got := p.Stats().NotInSubset; got != 3 {
		t.Fatalf("refusals counted %d, want 3", got)
	}
	if l, _ := p.Pick(Request{Cost: Tokens(10)}); l.Host() == "10.0.0.2:80" {
		t.Fatal("without a hint, the busy host was picked")
	}
}

// TestLeaseMove: a lease moved to the host that served the request takes
// its remaining charge there, and releases there exactly once.
func TestLeaseMove(t *testing.T) {
	p := mustNew(t, []string{"10.0.0.1:80", "10.0.0.2:80"}, Options{Seed: 1})
	two := func(HostState) Charge { return Charge{Tokens: 100, UntilFirstToken: 700, UntilEnd: 300, Decode: 300} }
	l, _ := p.Pick(Request{Cost: two})
	from := l.Host()
	to := "10.0.0.1:80"
	if from == to {
		to = "10.0.0.2:80"
	}
	if l.Move("10.9.9.9:80") || l.Move(from) {
		t.Fatal("moved to an unknown host, or to its own")
	}
	if !l.Move(to) || l.Host() != to {
		t.Fatalf("not moved: on %s", l.Host())
	}
	byAddr := func() map[string]HostLoad {
		m := map[string]HostLoad{}
		for _, h := range p.Hosts() {
			m[h.Address] = h
		}
		return m
	}
	h := byAddr()
	if h[from].Load != 0 || h[from].InFlightTokens != 0 || h[from].InFlightRequests != 0 || h[to].Load != 1000 || h[to].PrefillingTokens != 100 || h[to].InFlightRequests != 1 {
		t.Fatalf("after the move: %+v", h)
	}
	l.FirstToken()
	if h := byAddr()[to]; h.Load != 300 || h.PrefillingTokens != 0 || h.DecodingRequests != 1 {
		t.Fatalf("after the first token: %+v", h)
	}
	if !l.Release(ResponseEnd) || l.Release(ResponseEnd) || l.Move(from) {
		t.Fatal("not released exactly once, or moved after")
	}
	for _, x := range byAddr() {
		if x.Load != 0 || x.InFlightTokens != 0 || x.InFlightRequests != 0 || x.DecodingRequests != 0 {
			t.Fatalf("after the release: %+v", x)
		}
	}
}
