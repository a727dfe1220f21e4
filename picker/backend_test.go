package picker

import (
	"testing"
	"time"
)

var three = []string{"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}

func TestUnhealthyHostsAreSkipped(t *testing.T) {
	p := mustNew(t, three, Options{Seed: 1})
	p.SetHealth(three[0], Health{Down: true, Reason: "test"})
	for range 30 {
		l, err := p.Pick(Request{Cost: Tokens(10)})
		if err != nil || l.Host() == three[0] {
			t.Fatalf("picked %v, %v", l.Host(), err)
		}
		for _, f := range l.Fallbacks(5) {
			if f == three[0] {
				t.Fatalf("fallbacks %v list the unhealthy host", l.Fallbacks(5))
			}
		}
		l.Release(ResponseEnd)
	}
	if h := p.Hosts()[0]; !h.Health.Down || h.Health.Reason != "test" {
		t.Fatalf("Hosts shows %+v", h.Health)
	}
	// Every host down: pick among them anyway, and count it.
	p.SetHealth(three[1], Health{Down: true})
	p.SetHealth(three[2], Health{Down: true})
	l, err := p.Pick(Request{Cost: Tokens(10)})
	if err != nil {
		t.Fatal(err)
	}
	l.Release(ResponseEnd)
	if s := p.Stats(); s.PanicPicks != 1 {
		t.Fatalf("panic picks %d, want 1", s.PanicPicks)
	}
	if err := p.SetHealth("10.9.9.9:80", Health{}); err == nil {
		t.Fatal("SetHealth of an unknown host succeeded")
	}
}

// TestFastFailingHost: a host whose requests fail at once is always idle in
// the ledger, so it draws every request; ejecting it is what stops that.
func TestFastFailingHost(t *testing.T) {
	for _, eject := range []bool{false, true} {
		p := mustNew(t, three, Options{Seed: 1})
		var held []*Lease
		failing := 0
		for i := range 60 {
			if eject && i == 3 {
				p.SetHealth(three[0], Health{Down: true}) // what backend.Watcher does after 3 failures
			}
			l, _ := p.Pick(Request{Cost: Tokens(1000)})
			if l.Host() == three[0] {
				failing++
				l.Release(ResponseHeaders) // a 500 at once
				continue
			}
			held = append(held, l) // the healthy hosts take their time
		}
		for _, l := range held {
			l.Release(ResponseEnd)
		}
		if !eject && failing < 50 {
			t.Errorf("without ejection the failing host drew %d of 60 requests; the test expects it to draw most", failing)
		}
		if eject && failing > 3 {
			t.Errorf("with ejection the failing host drew %d of 60 requests, want at most the 3 before it", failing)
		}
	}
}

func TestModels(t *testing.T) {
	p := mustNew(t, three, Options{Seed: 1})
	p.SetModels(three[0], []string{"llama"})
	p.SetModels(three[1], []string{"llama", "qwen"})
	p.SetModels(three[2], []string{"qwen"})
	for _, tc := range []struct {
		model string
		want  map[string]bool
	}{
		{"llama", map[string]bool{three[0]: true, three[1]: true}},
		{"qwen", map[string]bool{three[1]: true, three[2]: true}},
		{"", map[string]bool{three[0]: true, three[1]: true, three[2]: true}},
	} {
		seen := map[string]bool{}
		for range 40 {
			l, err := p.Pick(Request{Cost: Tokens(100), Model: tc.model})
			if err != nil || !tc.want[l.Host()] {
				t.Fatalf("model %q: %v, %v", tc.model, l, err)
			}
			for _, f := range l.Fallbacks(3) {
				if !tc.want[f] {
					t.Fatalf("model %q: fallback %s does not serve it", tc.model, f)
				}
			}
			seen[l.Host()] = true
			l.Release(ResponseEnd)
		}
		if len(seen) != len(tc.want) {
			t.Errorf("model %q went to %v, want %v", tc.model, seen, tc.want)
		}
	}
	if _, err := p.Pick(Request{Cost: Tokens(1), Model: "gpt"}); err != ErrUnknownModel {
		t.Fatalf("unknown model: %v", err)
	}
	if p.Stats().UnknownModels != 1 {
		t.Fatal("unknown model not counted")
	}
	// A host whose models are not known gets a model no known host serves,
	// and no other: it could turn them away at once and look idle.
	p.SetModels(three[2], nil)
	if l, err := p.Pick(Request{Cost: Tokens(1), Model: "gpt"}); err != nil || l.Host() != three[2] {
		t.Fatalf("model on the host of unknown models: %v, %v", l, err)
	}
	for range 30 {
		l, _ := p.Pick(Request{Cost: Tokens(1), Model: "llama"})
		if l.Host() == three[2] {
			t.Fatal("a model known hosts serve went to the host of unknown models")
		}
		l.Release(ResponseEnd)
	}
	// With every host known to serve it down, a healthy host of unknown
	// models is tried before the unhealthy ones.
	p.SetHealth(three[0], Health{Down: true})
	p.SetHealth(three[1], Health{Down: true})
	if l, _ := p.Pick(Request{Cost: Tokens(1), Model: "llama"}); l.Host() != three[2] {
		t.Fatalf("llama with its hosts down went to %s", l.Host())
	}
	// UnknownServesAny: a host of unknown models is one of the model's.
	q := mustNew(t, three, Options{Seed: 1, UnknownServesAny: true})
	q.SetModels(three[0], []string{"llama"})
	q.SetModels(three[1], []string{"qwen"})
	seen := map[string]bool{}
	for range 40 {
		l, _ := q.Pick(Request{Cost: Tokens(1), Model: "llama"})
		seen[l.Host()] = true
		l.Release(ResponseEnd)
	}
	if !seen[three[0]] || !seen[three[2]] || seen[three[1]] {
		t.Fatalf("with UnknownServesAny, llama went to %v", seen)
	}
}

// TestRemoteLoad: requests a backend reports beyond the picker's own count
// as load, priced at the average recent charge; requests the picker sent are
// not counted twice; a zero report forgets it.
func TestRemoteLoad(t *testing.T) {
	p := mustNew(t, three, Options{Seed: 1})
	mine, _ := p.Pick(Request{Cost: Tokens(100)}) // sets the average charge to 100
	now := time.Now()
	p.SetRemote(mine.Host(), Remote{Running: 1, At: now}) // only mine
	if got := p.Hosts()[hostIndex(mine.Host())].ExternalLoad; got != 0 {
		t.Fatalf("own request counted as external load %d", got)
	}
	other := three[(hostIndex(mine.Host())+1)%3]
	p.SetRemote(other, Remote{Running: 2, Waiting: 1, KVCacheUsage: 1, At: now})
	if got := p.Hosts()[hostIndex(other)].ExternalLoad; got != 400 {
		t.Fatalf("external load %d, want 3 requests and one more for the full cache, at 100 each = 400", got)
	}
	// The busy-elsewhere host is avoided.
	for range 10 {
		l, _ := p.Pick(Request{Cost: Tokens(100)})
		if l.Host() == other {
			t.Fatal("picked the host other replicas loaded")
		}
		l.Release(ResponseEnd)
	}
	p.SetRemote(other, Remote{})
	if got := p.Hosts()[hostIndex(other)].ExternalLoad; got != 0 {
		t.Fatalf("a zero report left %d", got)
	}
	mine.Release(ResponseEnd)
}

// TestRemotePricing: a waiting request from elsewhere is priced at a whole
// charge, a running one at its decode part, and this picker's own requests
// not yet decoding are taken to be the waiting ones.
func TestRemotePricing(t *testing.T) {
	p := mustNew(t, three[:1], Options{Seed: 1})
	twoPart := func(HostState) Charge { return Charge{Tokens: 1, UntilFirstToken: 900, UntilEnd: 100} }
	a, _ := p.Pick(Request{Cost: twoPart}) // averages: 1,000 whole, 100 decode
	b, _ := p.Pick(Request{Cost: twoPart})
	a.FirstToken() // a decodes, b waits
	now := time.Now()
	for _, tc := range []struct {
		running, waiting int
		want             int64
	}{
		{1, 1, 0},          // a and b
		{3, 1, 200},        // two more running
		{1, 3, 2000},       // two more waiting
		{4, 4, 3000 + 300}, // beyond a and b: three more running, three more waiting
	} {
		p.SetRemote(three[0], Remote{Running: tc.running, Waiting: tc.waiting, At: now})
		if got := p.Hosts()[0].ExternalLoad; got != tc.want {
			t.Errorf("%d running, %d waiting: external load %d, want %d", tc.running, tc.waiting, got, tc.want)
		}
	}
	a.Release(ResponseEnd)
	b.Release(ResponseEnd)
}

func hostIndex(addr string) int {
	for i, h := range three {
		if h == addr {
			return i
		}
	}
	return -1
}

func TestPrefixAffinity(t *testing.T) {
	now := time.Unix(1000, 0)
	clock := func() time.Time { return now }
	p := mustNew(t, three, Options{Seed: 1, Now: clock, Affinity: Affinity{MaxExtraLoad: 500, TTL: time.Minute}})
	// A request whose prefill costs 1,000 here: a host that holds its
	// whole prompt saves all of it, more than MaxExtraLoad.
	prefill := func(HostState) Charge { return Charge{Tokens: 100, UntilFirstToken: 1000} }
	doc := []uint64{11, 12, 13}
	first, _ := p.Pick(Request{Cost: prefill, Prefix: doc})
	first.Release(ResponseEnd)
	home := first.Host()
	// The same prefix, and a longer one sharing it, go home.
	for _, pre := range [][]uint64{doc, {11, 12, 13, 14}, {11, 12}} {
		l, _ := p.Pick(Request{Cost: prefill, Prefix: pre})
		if l.Host() != home {
			t.Fatalf("prefix %v went to %s, not %s which served it", pre, l.Host(), home)
		}
		l.Release(ResponseEnd)
	}
	// Home busy by up to MaxExtraLoad: still home.
	busy, _ := p.Pick(Request{Cost: func(hs HostState) Charge {
		h := hs.Addr
		if h == home {
			return Charge{UntilEnd: 400}
		}
		return Charge{UntilEnd: 1 << 30}
	}})
	l, _ := p.Pick(Request{Cost: prefill, Prefix: doc})
	if l.Host() != home {
		t.Fatalf("with 400 extra load, went to %s", l.Host())
	}
	l.Release(ResponseEnd)
	// The same, but the three shared blocks of 100 bytes are 30% of a
	// 1,000-byte prompt: they save 300 of its prefill, less than the 400.
	l, _ = p.Pick(Request{Cost: prefill, Prefix: doc, PrefixBlockBytes: 100, PromptBytes: 1000})
	if l.Host() == home {
		t.Fatal("affinity kept a host 400 ahead to save 300")
	}
	l.Release(ResponseEnd)
	// Busier than that: the least loaded instead.
	busier, _ := p.Pick(Request{Cost: func(hs HostState) Charge {
		h := hs.Addr
		if h == home {
			return Charge{UntilEnd: 200}
		}
		return Charge{UntilEnd: 1 << 30}
	}})
	l, _ = p.Pick(Request{Cost: prefill, Prefix: doc})
	if l.Host() == home {
		t.Fatal("affinity ignored the load bound")
	}
	l.Release(ResponseEnd)
	busy.Release(ResponseEnd)
	busier.Release(ResponseEnd)
	s := p.Stats().Affinity
	// The 30% request went to another host, which then holds the prefix too
	// and takes the last one by affinity.
	if s[AffinityHit] != 5 || s[AffinityOverloaded] != 1 || s[AffinityNone] != 1 {
		t.Fatalf("affinity results %v", s)
	}
	// Past the TTL, the prefix is forgotten.
	now = now.Add(2 * time.Minute)
	l, _ = p.Pick(Request{Cost: prefill, Prefix: []uint64{11}})
	l.Release(ResponseEnd)
	if p.Stats().Affinity[AffinityNone] != 2 {
		t.Fatalf("a prefix older than the TTL still counted: %v", p.Stats().Affinity)
	}
}

// TestPrefixSavingAtPriorSpeed: with PrefillPerToken, the prefill a prefix
// saves is priced per prompt token, whatever the request's UntilFirstToken
// (which a cost model that learned cache hits prices near zero).
func TestPrefixSavingAtPriorSpeed(t *testing.T) {
	for _, tc := range []struct {
		perToken float64
		home     bool
	}{{0, false}, {5, true}} {
		p := mustNew(t, three, Options{Seed: 1, Affinity: Affinity{MaxExtraLoad: 10000, PrefillPerToken: tc.perToken}})
		cached := func(HostState) Charge { return Charge{Tokens: 100, UntilFirstToken: 10} } // learned: prefill looks free
		first, _ := p.Pick(Request{Cost: cached, Prefix: []uint64{1, 2}})
		home := first.Host()
		// home is now 410 ahead (first, plus 400 more): 100 tokens at 5 a
		// token save 500, at the UntilFirstToken 10.
		extra, _ := p.Pick(Request{Cost: func(hs HostState) Charge {
			h := hs.Addr
			if h == home {
				return Charge{UntilEnd: 400}
			}
			return Charge{UntilEnd: 1 << 30}
		}})
		l, _ := p.Pick(Request{Cost: cached, Prefix: []uint64{1, 2}})
		if got := l.Host() == home; got != tc.home {
			t.Errorf("PrefillPerToken %v: went home %v, want %v", tc.perToken, got, tc.home)
		}
		for _, x := range []*Lease{first, extra, l} {
			x.Release(ResponseEnd)
		}
	}
}
