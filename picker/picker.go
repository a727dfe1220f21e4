// Package picker keeps the in-flight token ledger of a set of backend hosts
// and picks the least-loaded one for each request.
//
// Pick chooses a host and charges it in one critical section, so concurrent
// requests see each other's charges and spread out instead of piling onto the
// host that looked idle a moment ago. It returns a Lease; releasing the lease
// subtracts exactly what was charged, once, whichever release comes first. A
// sweeper reclaims leases nobody released: the last guard against leaks, which
// should never fire.
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
	addr     string
	tokens   int64
	requests int64
	picks    uint64
}

// Lease is one request's charge on one host.
type Lease struct {
	p     *Picker
	h     *host
	cost  int64
	start time.Time
	done  bool // guarded by p.mu
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

// Pick chooses the host with the lowest in-flight tokens after adding cost
// (fewest in-flight requests next, then at random) and charges it cost, all in
// one step. The caller must Release the lease.
func (p *Picker) Pick(cost int64) (*Lease, error) {
	if cost < 0 {
		cost = 0
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	var best *host
	ties := 0
	for _, h := range p.hosts {
		if p.opts.MaxInFlightTokens > 0 && h.tokens > 0 && h.tokens+cost > p.opts.MaxInFlightTokens {
			continue
		}
		switch {
		case best == nil || h.tokens < best.tokens || (h.tokens == best.tokens && h.requests < best.requests):
			best, ties = h, 1
		case h.tokens == best.tokens && h.requests == best.requests:
			// Reservoir sampling: each of the tied hosts wins with equal odds.
			ties++
			if p.rng.IntN(ties) == 0 {
				best = h
			}
		}
	}
	if best == nil {
		p.rejectedPicks++
		return nil, ErrNoCapacity
	}
	best.tokens += cost
	best.requests++
	best.picks++
	l := &Lease{p: p, h: best, cost: cost, start: p.opts.Now()}
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
	slices.SortStableFunc(others, func(a, b *host) int { return cmp.Compare(a.tokens, b.tokens) })
	out := make([]string, 0, n)
	for _, h := range others[:min(n, len(others))] {
		out = append(out, h.addr)
	}
	return out
}

// Cost returns the tokens charged.
func (l *Lease) Cost() int64 { return l.cost }

// Release returns the lease's tokens to its host. Only the first call has an
// effect; it reports whether this call was the one.
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
	l.done = true
	l.h.tokens -= l.cost
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
			tokens += l.cost
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
	Address          string `json:"address"`
	InFlightTokens   int64  `json:"in_flight_tokens"`
	InFlightRequests int64  `json:"in_flight_requests"`
	Picks            uint64 `json:"picks"`
}

// Hosts returns a consistent snapshot of every host's load, in configuration
// order.
func (p *Picker) Hosts() []HostLoad {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]HostLoad, len(p.hosts))
	for i, h := range p.hosts {
		out[i] = HostLoad{Address: h.addr, InFlightTokens: h.tokens, InFlightRequests: h.requests, Picks: h.picks}
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
