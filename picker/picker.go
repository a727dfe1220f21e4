// Package picker keeps the in-flight ledger of a set of backend hosts and
// picks the least-loaded one for each request.
//
// Pick chooses a host and charges it in one critical section, so concurrent
// requests see each other's charges and spread out instead of piling onto the
// host that looked idle a moment ago. A charge has two parts: load held until
// the request's first token (its prefill) and load held until its end (its
// decode). It returns a Lease; FirstToken releases the first part and Release
// whatever is left, each exactly once, whichever call comes first. A sweeper
// reclaims leases nobody released: the last guard against leaks, which should
// never fire.
//
// What a request costs on each host is the caller's business (see package
// cost); the picker only adds, compares and subtracts.
package picker

import (
	"cmp"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sync"
	"time"
)

// ErrNoCapacity is returned by Pick when every host is busy beyond the
// configured in-flight token limit.
var ErrNoCapacity = errors.New("picker: every host is at its in-flight token limit")

// Cause says why a lease was released.
type Cause string

// Release causes.
const (
	ResponseHeaders   Cause = "response_headers"   // the backend answered, no body to follow (or none shown)
	ResponseEnd       Cause = "response_end"       // the response body (or its trailers) ended
	StreamEnd         Cause = "stream_end"         // the ext_proc stream ended first (client abort, reset, error)
	ImmediateResponse Cause = "immediate_response" // tokenlb answered the client itself
	Swept             Cause = "swept"              // the sweeper reclaimed a forgotten lease
)

// Options configure a Picker. The zero value is usable.
type Options struct {
	// MaxInFlightTokens caps each host's in-flight tokens; 0 means no cap. A
	// host with nothing in flight always accepts, so one request larger than
	// the cap still runs.
	MaxInFlightTokens int64
	// Tolerance makes hosts whose load after adding the request is above
	// the lowest by less than this fraction of the request's own cost
	// count as tied: among them the one with the fewest in-flight requests
	// wins, then one at random. A request's cost on each host is an
	// estimate; without a tolerance, a host whose speed estimate is a hair
	// better would take every request while the fleet is idle. 0 compares
	// exactly.
	Tolerance float64
	// StallWeight adds to a host's score the wait a request's prefill
	// imposes on the requests decoding there: its UntilFirstToken part
	// times the host's decoding requests, times StallWeight. A
	// continuous-batching server runs a prefill chunk in the same step as
	// every decoding sequence, so a long prompt stalls them all. The term
	// only steers the pick; nothing is charged for it. 0 leaves it out.
	StallWeight float64
	// Seed seeds tie-breaking; 0 picks a random seed.
	Seed uint64
	// Now is the clock used for lease ages; nil means time.Now.
	Now func() time.Time
}

// Picker is a ledger of in-flight tokens per host. It is safe for concurrent
// use.
type Picker struct {
	opts Options

	mu     sync.Mutex
	hosts  []*host
	leases map[*Lease]struct{}
	rng    *rand.Rand
	// Counters, read by Stats and the Prometheus collector.
	releases      map[Cause]uint64
	sweptTokens   int64
	rejectedPicks uint64
}

type host struct {
	addr       string
	tokens     int64 // prompt tokens in flight
	prefilling int64 // prompt tokens of requests still waiting for their first token
	load       int64 // charged load not yet released
	requests   int64
	decoding   int64 // requests past their first token
	picks      uint64
}

// Charge is what one request costs on one host.
type Charge struct {
	// Tokens are the request's prompt tokens: shown as in-flight tokens and
	// held against MaxInFlightTokens until the end.
	Tokens int64
	// UntilFirstToken is load released when the first token comes back.
	UntilFirstToken int64
	// UntilEnd is load released when the response ends.
	UntilEnd int64
}

// Cost says what a request would cost on a host. Pick calls it once per
// host, with the picker locked: it must be quick and must not call back into
// the picker.
type Cost func(host string) Charge

// Tokens is the simplest cost: n prompt tokens on any host, held until the
// end.
func Tokens(n int64) Cost {
	return func(string) Charge { return Charge{Tokens: n, UntilEnd: n} }
}

// Lease is one request's charge on one host.
type Lease struct {
	p      *Picker
	h      *host
	charge Charge
	start  time.Time
	ahead  int64 // the host's prefilling tokens when the lease was taken
	// Guarded by p.mu.
	first bool // the first-token part is released
	done  bool
}

// New returns a Picker over hosts, each a literal "ip:port" as Envoy's
// ORIGINAL_DST cluster requires. Addresses are normalised; duplicates and an
// empty list are errors.
func New(hosts []string, opts Options) (*Picker, error) {
	if len(hosts) == 0 {
		return nil, errors.New("picker: no hosts")
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	seed := opts.Seed
	if seed == 0 {
		seed = rand.Uint64()
	}
	p := &Picker{
		opts:     opts,
		leases:   make(map[*Lease]struct{}),
		rng:      rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
		releases: make(map[Cause]uint64),
	}
	seen := make(map[string]bool)
	for _, a := range hosts {
		addr, err := ParseAddr(a)
		if err != nil {
			return nil, err
		}
		if seen[addr] {
			return nil, fmt.Errorf("picker: duplicate host %s", addr)
		}
		seen[addr] = true
		p.hosts = append(p.hosts, &host{addr: addr})
	}
	return p, nil
}

// ParseAddr checks that s is a literal IP address with a port and returns its
// canonical form ("10.0.0.5:8000", "[fd00::5]:8000"). Host names are refused:
// Envoy's ORIGINAL_DST cluster cannot resolve them.
func ParseAddr(s string) (string, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return "", fmt.Errorf("picker: host %q is not a literal ip:port: %w", s, err)
	}
	if ap.Port() == 0 {
		return "", fmt.Errorf("picker: host %q has port 0", s)
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String(), nil
}

// DefaultTolerance is the Tolerance tokenlb uses: idle hosts whose speed
// estimates differ by a few percent of noise still share the work, while a
// host half as fast never ties with a full-speed one.
const DefaultTolerance = 0.1

// Pick charges the host with the lowest load after adding the request's cost
// on it (within Tolerance; fewest in-flight requests next, then at random),
// all in one step. The caller must Release the lease.
func (p *Picker) Pick(cost Cost) (*Lease, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	type option struct {
		h      *host
		charge Charge
		load   int64
	}
	opts := make([]option, 0, len(p.hosts))
	lowest, own := int64(-1), int64(0)
	for _, h := range p.hosts {
		c := cost(h.addr)
		c.Tokens, c.UntilFirstToken, c.UntilEnd = max(c.Tokens, 0), max(c.UntilFirstToken, 0), max(c.UntilEnd, 0)
		if p.opts.MaxInFlightTokens > 0 && h.tokens > 0 && h.tokens+c.Tokens > p.opts.MaxInFlightTokens {
			continue
		}
		load := h.load + c.UntilFirstToken + c.UntilEnd +
			int64(float64(c.UntilFirstToken)*float64(h.decoding)*p.opts.StallWeight)
		opts = append(opts, option{h, c, load})
		if lowest < 0 || load < lowest {
			lowest, own = load, c.UntilFirstToken+c.UntilEnd
		}
	}
	if len(opts) == 0 {
		p.rejectedPicks++
		return nil, ErrNoCapacity
	}
	limit := lowest + int64(float64(own)*p.opts.Tolerance)
	var best option
	ties := 0
	for _, o := range opts {
		switch {
		case o.load > limit:
		case ties == 0 || o.h.requests < best.h.requests:
			best, ties = o, 1
		case o.h.requests == best.h.requests:
			// Reservoir sampling: each of the tied hosts wins with equal odds.
			ties++
			if p.rng.IntN(ties) == 0 {
				best = o
			}
		}
	}
	h := best.h
	l := &Lease{p: p, h: h, charge: best.charge, start: p.opts.Now(), ahead: h.prefilling}
	h.tokens += best.charge.Tokens
	h.prefilling += best.charge.Tokens
	h.load += best.charge.UntilFirstToken + best.charge.UntilEnd
	h.requests++
	h.picks++
	p.leases[l] = struct{}{}
	return l, nil
}

// Host returns the leased host's address.
func (l *Lease) Host() string { return l.h.addr }

// Fallbacks returns up to n other hosts, least loaded first, for a proxy to
// try if the leased host cannot be reached. They are not charged: a retry
// is rare, and the ledger keeps the charge on the host first picked.
func (l *Lease) Fallbacks(n int) []string {
	p := l.p
	p.mu.Lock()
	defer p.mu.Unlock()
	others := make([]*host, 0, len(p.hosts)-1)
	for _, h := range p.hosts {
		if h != l.h {
			others = append(others, h)
		}
	}
	slices.SortStableFunc(others, func(a, b *host) int { return cmp.Compare(a.load, b.load) })
	out := make([]string, 0, n)
	for _, h := range others[:min(n, len(others))] {
		out = append(out, h.addr)
	}
	return out
}

// Charge returns what the lease charged.
func (l *Lease) Charge() Charge { return l.charge }

// Start returns when the lease was taken.
func (l *Lease) Start() time.Time { return l.start }

// Ahead returns the prompt tokens that were waiting for their first token on
// the host when the lease was taken: the prefill queued in front of it.
func (l *Lease) Ahead() int64 { return l.ahead }

// FirstToken records that the request's first token came back: it releases
// the UntilFirstToken part of the charge. Only the first call, and only
// before Release, has an effect; it reports whether this call was the one.
func (l *Lease) FirstToken() bool {
	p := l.p
	p.mu.Lock()
	defer p.mu.Unlock()
	if l.first || l.done {
		return false
	}
	p.firstLocked(l)
	l.h.decoding++
	return true
}

func (p *Picker) firstLocked(l *Lease) {
	l.first = true
	l.h.prefilling -= l.charge.Tokens
	l.h.load -= l.charge.UntilFirstToken
}

// Release returns whatever the lease still holds to its host. Only the first
// call has an effect; it reports whether this call was the one.
func (l *Lease) Release(cause Cause) bool {
	p := l.p
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.releaseLocked(l, cause)
}

func (p *Picker) releaseLocked(l *Lease, cause Cause) bool {
	if l.done {
		return false
	}
	if !l.first {
		p.firstLocked(l)
	} else {
		l.h.decoding--
	}
	l.done = true
	l.h.tokens -= l.charge.Tokens
	l.h.load -= l.charge.UntilEnd
	l.h.requests--
	delete(p.leases, l)
	p.releases[cause]++
	return true
}

// Sweep releases every lease older than ttl and returns how many it released
// and their tokens. A correct server never leaves one behind: whatever Sweep
// reclaims is a bug made visible.
func (p *Picker) Sweep(ttl time.Duration) (leases int, tokens int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	cutoff := p.opts.Now().Add(-ttl)
	for l := range p.leases {
		if l.start.Before(cutoff) {
			p.releaseLocked(l, Swept)
			leases++
			tokens += l.charge.Tokens
		}
	}
	p.sweptTokens += tokens
	return leases, tokens
}

// RunSweeper calls Sweep every interval until stop is closed.
func (p *Picker) RunSweeper(stop <-chan struct{}, interval, ttl time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			p.Sweep(ttl)
		}
	}
}

// HostLoad is one host's share of the ledger.
type HostLoad struct {
	Address        string `json:"address"`
	InFlightTokens int64  `json:"in_flight_tokens"`
	// PrefillingTokens are the in-flight prompt tokens whose first token has
	// not come back yet.
	PrefillingTokens int64 `json:"prefilling_tokens"`
	// Load is the charged load not yet released, in the cost's unit.
	Load             int64 `json:"load"`
	InFlightRequests int64 `json:"in_flight_requests"`
	// DecodingRequests are the in-flight requests past their first token.
	DecodingRequests int64  `json:"decoding_requests"`
	Picks            uint64 `json:"picks"`
}

// Hosts returns a consistent snapshot of every host's load, in configuration
// order.
func (p *Picker) Hosts() []HostLoad {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]HostLoad, len(p.hosts))
	for i, h := range p.hosts {
		out[i] = HostLoad{Address: h.addr, InFlightTokens: h.tokens, PrefillingTokens: h.prefilling, Load: h.load,
			InFlightRequests: h.requests, DecodingRequests: h.decoding, Picks: h.picks}
	}
	return out
}

// Stats are the ledger's lifetime counters.
type Stats struct {
	Releases      map[Cause]uint64
	SweptTokens   int64
	RejectedPicks uint64
	OpenLeases    int
}

// Stats returns a snapshot of the ledger's counters.
func (p *Picker) Stats() Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := Stats{Releases: make(map[Cause]uint64, len(p.releases)), SweptTokens: p.sweptTokens,
		RejectedPicks: p.rejectedPicks, OpenLeases: len(p.leases)}
	for c, n := range p.releases {
		s.Releases[c] = n
	}
	return s
}
