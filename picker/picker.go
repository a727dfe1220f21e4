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
// cost); the picker only adds, compares and subtracts. What it knows of each
// host from outside its own ledger (health, models served, the backend's own
// queue) is set by the caller too (see package backend), and weighs in each
// pick: see Pick.
package picker

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tokenlb/tokenlb/prefix"
)

// ErrNoCapacity is returned by Pick when every host is busy beyond the
// configured in-flight token limit.
var ErrNoCapacity = errors.New("picker: every host is at its in-flight token limit")

// ErrNotInSubset is returned by Pick when a Request.Subset names no host
// that may take the request.
var ErrNotInSubset = errors.New("picker: no host of the subset hint may take the request")

// ErrUnknownModel is returned by Pick when no host serves the requested
// model.
var ErrUnknownModel = errors.New("picker: no host serves the model")

// Cause says why a lease was released. The caller names its own causes
// (package route names them after how a response ends); the picker's own
// is Swept.
type Cause string

// Swept is the cause of a release by the sweeper: a lease nobody released.
const Swept Cause = "swept"

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
	// Affinity, when its MaxExtraLoad is positive, sends a request to a host
	// that recently served the same prompt prefix, whose backend likely
	// still caches it, unless that host is too loaded.
	Affinity Affinity
	// UnknownServesAny makes hosts whose models are not known (SetModels
	// never called, or with nil) serve every model, as when models are
	// configured for some hosts and never asked of the others; otherwise
	// they get a model only when no healthy host is known to serve it.
	UnknownServesAny bool
	// Seed seeds tie-breaking; 0 picks a random seed.
	Seed uint64
	// Now is the clock used for lease ages; nil means time.Now.
	Now func() time.Time
}

// Affinity configures prefix affinity.
type Affinity struct {
	// MaxExtraLoad is how much more load (after adding the request) than
	// the least-loaded host a host that recently served the request's
	// prefix may have and still be chosen, in the cost's unit; it may
	// never have more than the prefill the prefix saves (the prefix's
	// share of the prompt times the request's UntilFirstToken there, or
	// times its tokens at PrefillPerToken). It bounds affinity by load, so
	// that one popular prefix cannot pile its requests onto one host. 0
	// turns affinity off.
	MaxExtraLoad int64
	// PrefillPerToken, when positive, prices the prefill a prefix saves at
	// this much load per prompt token (Charge.Tokens), rather than at the
	// request's UntilFirstToken: a cost model that learns host speeds from
	// times to first token learns cache hits too, and would price the
	// prefill a cache saves at next to nothing.
	PrefillPerToken float64
	// TTL is how long a host counts as having served a prefix; a backend's
	// cache evicts what it has not used for a while. 0 means 5 minutes.
	TTL time.Duration
	// Entries bounds the prefix table (each entry about 100 bytes); 0
	// means 1<<16.
	Entries int
}

// Picker is a ledger of each host's load: the charges of the requests in
// flight there, in the cost's unit, with their prompt tokens and counts. It
// is safe for concurrent use.
type Picker struct {
	opts Options

	mu     sync.Mutex
	hosts  []*host
	gone   []*host // removed by SetHosts with requests still in flight, until they end
	leases map[*Lease]struct{}
	rng    *rand.Rand
	// Counters, read by Stats and the Prometheus collector.
	releases      map[Cause]uint64
	sweptTokens   int64
	rejectedPicks uint64
	unknownModels uint64
	subsetMisses  uint64
	panicPicks    uint64
	priced        uint64 // picks that taught perRequest and perDecode
	affinity      map[AffinityResult]uint64
	// perRequest and perDecode are moving averages of the load a request
	// charges in all and until its end (its decode part), to price the
	// requests a backend reports that this picker did not send: a waiting
	// one at the first, a running one at the second.
	perRequest, perDecode float64
	prefixes              *prefix.Table
}

type host struct {
	index      int // in the prefix table; unique among p.hosts
	addr       string
	removed    bool  // by SetHosts: no new picks; kept in p.gone while requests are in flight
	tokens     int64 // prompt tokens in flight
	prefilling int64 // prompt tokens of requests still waiting for their first token
	uncached   int64 // Charge.Uncached of those
	load       int64 // charged load not yet released
	decode     int64 // Charge.Decode of the requests in flight
	requests   int64
	decoding   int64 // requests past their first token
	picks      uint64

	// From outside the ledger (Set*).
	origin Origin // where the host came from (SetOrigin)
	health Health
	models map[string]bool // nil: not known
	remote Remote
	// external is the load of the requests the backend reported beyond
	// this picker's own, priced by SetRemote when the report came.
	external int64
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
	// Wait, when positive, is the request's predicted time to first token
	// on the host, given what is there (µs): the host's score is then Wait
	// plus the load the request adds (what it will delay the requests
	// after it), plus the backend's external load and the stall term. 0
	// means no prediction: the score is the host's load after adding the
	// request (plus the same two).
	Wait int64
	// Decode is the request's expected decode time on the host (µs),
	// whatever part of it is charged: HostState.Decode sums it over the
	// requests in flight, for a cost that learns what decoding requests do
	// there.
	Decode int64
	// Uncached are the prompt tokens the host is expected to prefill (in
	// its own count, less what its cache holds): HostState.Uncached sums
	// them over the requests waiting for their first token.
	Uncached int64
}

// HostState is what a Cost sees of a host: its ledger when the request
// arrives.
type HostState struct {
	Addr string
	// Requests are in flight; Decoding of them are past their first token.
	Requests, Decoding int64
	// PrefillingTokens are the prompt tokens of the requests still waiting
	// for their first token, and Uncached the sum of their
	// Charge.Uncached: what the host has yet to prefill of them.
	PrefillingTokens, Uncached int64
	// Load is the charged load not yet released, and Decode the sum of
	// Charge.Decode of the requests in flight (µs).
	Load, Decode int64
	// PrefixShare is the share of this request's prompt that the host
	// recently served as a prefix of another (and likely still caches);
	// 0 without prefix affinity.
	PrefixShare float64
}

// Request is what Pick needs to know of a request.
type Request struct {
	// Cost prices the request on each host.
	Cost Cost
	// Model, when not empty, restricts the pick to the hosts that serve it
	// (see candidates for hosts whose models are not known).
	Model string
	// Prefix holds a hash of each leading block of the prompt, each
	// covering every block before it too, for prefix affinity; the blocks
	// are PrefixBlockBytes long, of a prompt of PromptBytes.
	Prefix           []uint64
	PrefixBlockBytes int
	PromptBytes      int
	// Subset, when not nil, restricts the pick to these addresses (the
	// Endpoint Picker Protocol's subset hint: a data plane that knows
	// better which endpoints may serve); none of them eligible, or an
	// empty Subset, is ErrNotInSubset.
	Subset []string
	// Spread is how far apart, relative to the lowest, scores must be to
	// tell hosts apart: how wrong the cost's predictions have been. Hosts
	// within it count as tied (as within Options.Tolerance), so that a cost
	// that predicts poorly leaves the choice to the fewest in-flight
	// requests. 0 adds nothing to Tolerance.
	Spread float64
}

// Cost says what a request would cost on a host, given the host's state.
// Pick calls it once per host, with the picker locked: it must be quick and
// must not call back into the picker.
type Cost func(h HostState) Charge

// Tokens is the simplest cost: n prompt tokens on any host, held until the
// end.
func Tokens(n int64) Cost {
	return func(HostState) Charge { return Charge{Tokens: n, UntilEnd: n} }
}

// Lease is one request's charge on one host.
type Lease struct {
	p      *Picker
	h      atomic.Pointer[host] // moved only by Move, under p.mu; read without it by Host
	charge Charge
	start  time.Time
	ahead  int64 // the host's prefilling tokens when the lease was taken
	model  string
	state  HostState // the host when the lease was taken
	why    Why
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
		affinity: make(map[AffinityResult]uint64),
	}
	addrs, err := p.parseHosts(hosts)
	if err != nil {
		return nil, err
	}
	for _, addr := range addrs {
		p.hosts = append(p.hosts, &host{index: len(p.hosts), addr: addr})
	}
	if opts.Affinity.MaxExtraLoad > 0 {
		p.prefixes = prefix.NewTable(prefix.Options{TTL: opts.Affinity.TTL, Entries: opts.Affinity.Entries})
	}
	return p, nil
}

// parseHosts checks a host list: literal ip:port addresses, normalised, no
// duplicates, not empty, and at most prefix.MaxHosts with prefix affinity.
func (p *Picker) parseHosts(hosts []string) ([]string, error) {
	if len(hosts) == 0 {
		return nil, errors.New("picker: no hosts")
	}
	var addrs []string
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
		addrs = append(addrs, addr)
	}
	if p.opts.Affinity.MaxExtraLoad > 0 && len(addrs) > prefix.MaxHosts {
		return nil, fmt.Errorf("picker: prefix affinity supports at most %d hosts, not %d", prefix.MaxHosts, len(addrs))
	}
	return addrs, nil
}

// SetHosts makes hosts the fleet, in that order, and reports the addresses
// it added and removed. A new host starts with an empty ledger, healthy and
// with its models unknown, and is routable at once. A removed host gets no
// new pick from now on; the requests in flight there still release their
// charges (exactly once, as ever), and it stays in Hosts, marked removed,
// until the last one has; what the prefix table remembers of it goes now.
// An invalid list changes nothing.
func (p *Picker) SetHosts(hosts []string) (added, removed []string, err error) {
	addrs, err := p.parseHosts(hosts)
	if err != nil {
		return nil, nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	old := make(map[string]*host, len(p.hosts))
	for _, h := range p.hosts {
		old[h.addr] = h
	}
	keep := make(map[string]bool, len(addrs))
	for _, a := range addrs {
		keep[a] = true
	}
	used := make(map[int]bool)
	for _, h := range p.hosts {
		if keep[h.addr] {
			used[h.index] = true
			continue
		}
		h.removed = true
		removed = append(removed, h.addr)
		if p.prefixes != nil {
			p.prefixes.Forget(h.index)
		}
		if h.requests > 0 {
			p.gone = append(p.gone, h)
		}
	}
	next := make([]*host, 0, len(addrs))
	for _, a := range addrs {
		if h := old[a]; h != nil {
			next = append(next, h)
			continue
		}
		h := p.revive(a)
		if h == nil {
			h = &host{addr: a}
		}
		for h.index = 0; used[h.index]; h.index++ {
		}
		used[h.index] = true // the prefix table forgot it when its last holder left
		added = append(added, a)
		next = append(next, h)
	}
	p.hosts = next
	return added, removed, nil
}

// revive takes addr out of p.gone, where it waits for its requests in
// flight, so that it rejoins with its ledger; nil if it is not there.
func (p *Picker) revive(addr string) *host {
	for i, h := range p.gone {
		if h.addr == addr {
			p.gone = slices.Delete(p.gone, i, i+1)
			h.removed = false
			return h
		}
	}
	return nil
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
	if ap.Addr().Zone() != "" {
		return "", fmt.Errorf("picker: host %q has an IPv6 zone, which Envoy's ORIGINAL_DST cluster cannot use", s)
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String(), nil
}

// DefaultTolerance is the Tolerance tokenlb uses: idle hosts whose speed
// estimates differ by a few percent of noise still share the work, while a
// host half as fast never ties with a full-speed one.
const DefaultTolerance = 0.1

// Pick charges a host for r, all in one step, and returns the lease; the
// caller must Release it. It goes through four steps under one lock:
//
//   - candidates: the hosts that serve r.Model and are healthy; when none
//     of those is healthy, all that serve the model (as Envoy's panic mode
//     does: a health signal that rules out every host is more likely wrong
//     than the hosts).
//   - score: a host's score is its load after adding the request's cost
//     there (or, when the cost predicts the request's time to first token
//     there, Charge.Wait, that prediction plus what the request adds),
//     plus the load its backend reports beyond this picker's own requests;
//     hosts at MaxInFlightTokens drop out.
//   - choose: with affinity on, a host that recently served r's prefix wins
//     when its score is above the lowest by no more than the prefill the
//     prefix saves there, nor than Affinity.MaxExtraLoad; otherwise the
//     lowest score wins, within Tolerance and Request.Spread, and among
//     near ties the fewest in-flight requests, then a host at random.
//   - charge: the chosen host's ledger takes the request's cost.
func (p *Picker) Pick(r Request) (*Lease, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	hosts, anyHealthy := p.candidates(r.Model)
	if len(hosts) == 0 {
		p.unknownModels++
		return nil, ErrUnknownModel
	}
	if r.Subset != nil {
		if hosts, anyHealthy = inSubset(hosts, r.Subset); len(hosts) == 0 {
			p.subsetMisses++
			return nil, ErrNotInSubset
		}
	}
	if !anyHealthy {
		p.panicPicks++
	}
	now := p.opts.Now()
	opts, lowest, own := p.score(hosts, anyHealthy, r, now)
	if len(opts) == 0 {
		p.rejectedPicks++
		return nil, ErrNoCapacity
	}
	why := PrefixHit
	best, ok := p.byAffinity(r, opts, lowest, now)
	if !ok {
		best, why = p.leastLoaded(opts, lowest, own, r.Spread), LeastLoad
	}
	if !anyHealthy {
		why = NoHealthyHost
	}
	l := p.charge(best, r, now)
	l.why = why
	return l, nil
}

// Why says why a pick chose its host, for logs.
type Why string

const (
	LeastLoad     Why = "least_load"      // the lowest load after adding the request
	PrefixHit     Why = "prefix_hit"      // a host that served the prompt's prefix recently (prefix affinity)
	NoHealthyHost Why = "no_healthy_host" // the least loaded of the unhealthy hosts: none serving the model was healthy
)

// option is a host a request may go to, with what it would cost there, the
// host's state it was priced on and the host's score.
type option struct {
	h      *host
	charge Charge
	state  HostState
	score  int64
}

// score prices the request on each candidate that can take it (healthy
// ones only when some are, and under MaxInFlightTokens) and returns them
// with the lowest score and the request's own cost on that host.
func (p *Picker) score(hosts []*host, healthyOnly bool, r Request, now time.Time) (opts []option, lowest, own int64) {
	opts = make([]option, 0, len(hosts))
	lowest = -1
	for _, h := range hosts {
		if healthyOnly && !h.health.Healthy() {
			continue
		}
		st := p.state(h, r, now)
		c := r.Cost(st)
		c.Tokens, c.UntilFirstToken, c.UntilEnd = max(c.Tokens, 0), max(c.UntilFirstToken, 0), max(c.UntilEnd, 0)
		c.Wait, c.Decode, c.Uncached = max(c.Wait, 0), max(c.Decode, 0), max(c.Uncached, 0)
		if p.opts.MaxInFlightTokens > 0 && h.tokens > 0 && h.tokens+c.Tokens > p.opts.MaxInFlightTokens {
			continue
		}
		wait := h.load // without a prediction, the load ahead
		if c.Wait > 0 {
			wait = c.Wait
		}
		score := wait + h.external + c.UntilFirstToken + c.UntilEnd +
			int64(float64(c.UntilFirstToken)*float64(h.decoding)*p.opts.StallWeight)
		opts = append(opts, option{h, c, st, score})
		if lowest < 0 || score < lowest {
			lowest, own = score, c.UntilFirstToken+c.UntilEnd
		}
	}
	return opts, lowest, own
}

// state is what a Cost sees of host h for request r.
func (p *Picker) state(h *host, r Request, now time.Time) HostState {
	st := HostState{Addr: h.addr, Requests: h.requests, Decoding: h.decoding, PrefillingTokens: h.prefilling, Uncached: h.uncached,
		Load: h.load, Decode: h.decode}
	if p.prefixes != nil && len(r.Prefix) > 0 && r.PromptBytes > 0 && r.PrefixBlockBytes > 0 {
		blocks := p.prefixes.Served(r.Prefix, h.index, now)
		st.PrefixShare = min(1, float64(blocks*r.PrefixBlockBytes)/float64(r.PromptBytes))
	}
	return st
}

// byAffinity returns the host that recently served the longest of r's
// prefixes among those within the load bound (ok false when none, or when
// affinity is off), and counts what affinity did.
func (p *Picker) byAffinity(r Request, opts []option, lowest int64, now time.Time) (best option, ok bool) {
	if p.prefixes == nil || len(r.Prefix) == 0 {
		return option{}, false
	}
	// Hosts within the load bound are eligible; the longest prefix one of
	// them served wins.
	var eligible uint64
	for _, o := range opts {
		if o.score <= lowest+p.opts.Affinity.MaxExtraLoad {
			eligible |= 1 << o.h.index
		}
	}
	hosts, matched, served := p.prefixes.Lookup(r.Prefix, eligible, now)
	// A host that holds the prefix saves the prefill of that part of the
	// prompt: it may be ahead of the least loaded by no more than that (and
	// MaxExtraLoad).
	share := 1.0
	if r.PromptBytes > 0 && r.PrefixBlockBytes > 0 {
		share = min(1, float64(matched*r.PrefixBlockBytes)/float64(r.PromptBytes))
	}
	for _, o := range opts {
		saved := share * float64(o.charge.UntilFirstToken)
		if p.opts.Affinity.PrefillPerToken > 0 {
			saved = share * float64(o.charge.Tokens) * p.opts.Affinity.PrefillPerToken
		}
		allowed := min(p.opts.Affinity.MaxExtraLoad, int64(saved))
		if hosts&(1<<o.h.index) != 0 && o.score <= lowest+allowed && (!ok || o.score < best.score) {
			best, ok = o, true
		}
	}
	switch {
	case ok:
		p.affinity[AffinityHit]++
	case served:
		p.affinity[AffinityOverloaded]++
	default:
		p.affinity[AffinityNone]++
	}
	return best, ok
}

// leastLoaded returns the option with the lowest score, counting those
// within Tolerance of the request's own cost, or within spread of the
// lowest score, as tied: among them the one with the fewest in-flight
// requests, then one at random.
func (p *Picker) leastLoaded(opts []option, lowest, own int64, spread float64) option {
	var best option
	limit := lowest + max(int64(float64(own)*p.opts.Tolerance), int64(float64(lowest)*spread))
	ties := 0
	for _, o := range opts {
		switch {
		case o.score > limit:
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
	return best
}

// charge puts the chosen option's cost on its host's ledger and returns the
// lease; the prefix table notes the host served r's prefix.
func (p *Picker) charge(best option, r Request, now time.Time) *Lease {
	h := best.h
	if p.prefixes != nil && len(r.Prefix) > 0 {
		p.prefixes.Record(r.Prefix, h.index, now)
	}
	// Requests that cost nothing (a GET, an empty body) do not teach the
	// averages.
	if charged, decode := float64(best.charge.UntilFirstToken+best.charge.UntilEnd), float64(best.charge.UntilEnd); charged > 0 {
		if p.priced == 0 {
			p.perRequest, p.perDecode = charged, decode
		} else {
			p.perRequest += (charged - p.perRequest) / perRequestMemory
			p.perDecode += (decode - p.perDecode) / perRequestMemory
		}
		p.priced++
	}
	l := &Lease{p: p, charge: best.charge, start: now, ahead: h.prefilling, model: r.Model, state: best.state}
	l.h.Store(h)
	l.hold(h, 1)
	h.picks++
	p.leases[l] = struct{}{}
	return l
}

// candidates returns the hosts that may serve model, healthy or not (score
// leaves out the unhealthy ones when one is healthy), and whether one of
// them is healthy: those known to serve it, if one of them is healthy; else
// those whose models are not known (which may serve it), if one of them is
// healthy; else all of these, for a pick among unhealthy hosts. A host
// whose list is unknown would otherwise draw requests for models it turns
// away at once, and look idle doing so. With Options.UnknownServesAny,
// hosts whose models are not known count as serving every model.
func (p *Picker) candidates(model string) (hosts []*host, anyHealthy bool) {
	if model == "" {
		for _, h := range p.hosts {
			anyHealthy = anyHealthy || h.health.Healthy()
		}
		return p.hosts, anyHealthy
	}
	var known, unknown []*host
	knownUp, unknownUp := false, false
	for _, h := range p.hosts {
		switch {
		case h.models == nil && p.opts.UnknownServesAny:
			known = append(known, h)
			knownUp = knownUp || h.health.Healthy()
		case h.models == nil:
			unknown = append(unknown, h)
			unknownUp = unknownUp || h.health.Healthy()
		case h.models[model]:
			known = append(known, h)
			knownUp = knownUp || h.health.Healthy()
		}
	}
	switch {
	case knownUp:
		return known, true
	case unknownUp:
		return unknown, true
	}
	return append(known, unknown...), false
}

// inSubset returns the hosts whose address subset names (in any form
// ParseAddr accepts), and whether one of them is healthy.
func inSubset(hosts []*host, subset []string) (in []*host, anyHealthy bool) {
	names := make(map[string]bool, len(subset))
	for _, s := range subset {
		if a, err := ParseAddr(strings.TrimSpace(s)); err == nil {
			names[a] = true
		}
	}
	for _, h := range hosts {
		if names[h.addr] {
			in = append(in, h)
			anyHealthy = anyHealthy || h.health.Healthy()
		}
	}
	return in, anyHealthy
}

// perRequestMemory is about how many picks the average charge remembers.
const perRequestMemory = 100

// AffinityResult says what prefix affinity did for one pick.
type AffinityResult string

// Affinity results.
const (
	AffinityNone       AffinityResult = "none"       // no host recently served the prefix
	AffinityHit        AffinityResult = "hit"        // a host that did was chosen
	AffinityOverloaded AffinityResult = "overloaded" // those that did were too loaded (or ineligible)
)

// Health is what health checks know of a host. The zero value is healthy.
type Health struct {
	// Down ejects the host: it gets no requests while another host that
	// serves the model is healthy.
	Down bool `json:"down"`
	// Reason says why the host is down, or why it last was.
	Reason string `json:"reason,omitempty"`
	// Since is when the host went down.
	Since time.Time `json:"since,omitzero"`
	// Until is when an ejection for a time ends (zero: until checks pass).
	Until time.Time `json:"until,omitzero"`
}

// Healthy reports whether the host may get requests.
func (h Health) Healthy() bool { return !h.Down }

// Remote is what a host's backend reports of its own queue, which holds
// requests from every tokenlb in front of it.
type Remote struct {
	Running int `json:"running"` // requests in the running batch
	Waiting int `json:"waiting"` // requests waiting to be scheduled
	// KVCacheUsage is the share of the KV cache in use, 0 to 1.
	KVCacheUsage float64   `json:"kv_cache_usage"`
	At           time.Time `json:"at"` // when it was read; zero: nothing known
}

// SetHealth records what health checks know of the host at addr.
func (p *Picker) SetHealth(addr string, h Health) error {
	return p.update(addr, func(x *host) { x.health = h })
}

// Origin says where a host came from, for /debug/hosts.
type Origin struct {
	// Source is "static", "dns <name:port>", or "kubernetes
	// inferencepool|service <namespace>/<name>".
	Source string `json:"source,omitempty"`
	// Namespace and Pod name the pod behind the address, when known.
	Namespace string `json:"namespace,omitempty"`
	Pod       string `json:"pod,omitempty"`
}

// SetOrigin records where the host came from, for /debug/hosts.
func (p *Picker) SetOrigin(addr string, o Origin) error {
	return p.update(addr, func(h *host) { h.origin = o })
}

// SetModels records the models the host at addr serves; nil means not
// known (see Options.UnknownServesAny).
func (p *Picker) SetModels(addr string, models []string) error {
	return p.update(addr, func(x *host) {
		if models == nil {
			x.models = nil
			return
		}
		x.models = make(map[string]bool, len(models))
		for _, m := range models {
			x.models[m] = true
		}
	})
}

// SetRemote records what the backend at addr reports of its queue. The requests
// it reports beyond those this picker has in flight there came through
// other tokenlb replicas (or around tokenlb), and add to the host's score
// until the next report: a waiting one at the average whole charge of this
// picker's recent requests, a running one at their average decode part (its
// prefill is mostly done). A KV cache that is full adds one more waiting
// request: the next one waits for memory there. A zero Remote forgets the
// report.
func (p *Picker) SetRemote(addr string, r Remote) error {
	return p.update(addr, func(x *host) {
		x.remote = r
		x.external = 0
		if r.At.IsZero() {
			return
		}
		others := max(0, int64(r.Running+r.Waiting)-x.requests)
		// This picker's requests not yet decoding are most of what waits.
		waiting := min(others, max(0, int64(r.Waiting)-(x.requests-x.decoding)))
		running := others - waiting
		load := float64(waiting)*p.perRequest + float64(running)*p.perDecode
		if r.KVCacheUsage > kvFull {
			load += min(1, (r.KVCacheUsage-kvFull)/(1-kvFull)) * p.perRequest
		}
		x.external = int64(load)
	})
}

// kvFull is the KV cache usage above which a backend is about to queue
// requests for memory.
const kvFull = 0.9

func (p *Picker) update(addr string, f func(*host)) error {
	a, err := ParseAddr(addr)
	if err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, h := range p.hosts {
		if h.addr == a {
			f(h)
			return nil
		}
	}
	return fmt.Errorf("picker: unknown host %s", a)
}

// Host returns the leased host's address.
func (l *Lease) Host() string { return l.h.Load().addr }

// Why says why the pick chose the host.
func (l *Lease) Why() Why { return l.why }

// Fallbacks returns up to n other healthy hosts that serve the request's
// model, least loaded first, for a proxy to try if the leased host cannot
// be reached. They are not charged: a retry
// is rare, and the ledger keeps the charge on the host first picked.
func (l *Lease) Fallbacks(n int) []string {
	p := l.p
	p.mu.Lock()
	defer p.mu.Unlock()
	others := make([]*host, 0, len(p.hosts)-1)
	hosts, _ := p.candidates(l.model)
	for _, h := range hosts {
		if h != l.h.Load() && h.health.Healthy() {
			others = append(others, h)
		}
	}
	slices.SortStableFunc(others, func(a, b *host) int { return cmp.Compare(a.load+a.external, b.load+b.external) })
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

// State returns the host's state the request was priced on when the lease
// was taken.
func (l *Lease) State() HostState { return l.state }

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
	h := l.h.Load()
	l.hold(h, -1)
	l.first = true
	l.hold(h, 1)
	return true
}

// hold adds to host h (sign 1) or takes from it (-1) what the lease holds
// in its present phase: before the first token its whole charge, its
// tokens as prefilling; after it, the UntilEnd part, as a decoding
// request. Guarded by p.mu.
func (l *Lease) hold(h *host, sign int64) {
	c := l.charge
	h.tokens += sign * c.Tokens
	h.load += sign * c.UntilEnd
	h.decode += sign * c.Decode
	h.requests += sign
	if l.first {
		h.decoding += sign
		return
	}
	h.prefilling += sign * c.Tokens
	h.uncached += sign * c.Uncached
	h.load += sign * c.UntilFirstToken
}

// leftLocked drops a removed host from p.gone once its last request ended.
func (p *Picker) leftLocked(h *host) {
	if h.removed && h.requests == 0 {
		p.gone = slices.DeleteFunc(p.gone, func(x *host) bool { return x == h })
	}
}

// Move moves what the lease still holds to the host at addr: the data
// plane served the request there (a retry on a fallback host). It reports
// whether it moved anything: not once released, nor to an unknown host or
// the one it is on.
func (l *Lease) Move(addr string) bool {
	a, err := ParseAddr(addr)
	if err != nil {
		return false
	}
	p := l.p
	p.mu.Lock()
	defer p.mu.Unlock()
	from := l.h.Load()
	if l.done || a == from.addr {
		return false
	}
	i := slices.IndexFunc(p.hosts, func(h *host) bool { return h.addr == a })
	if i < 0 {
		return false
	}
	to := p.hosts[i]
	l.hold(from, -1)
	l.hold(to, 1)
	l.h.Store(to)
	p.leftLocked(from)
	return true
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
	h := l.h.Load()
	l.hold(h, -1)
	l.done = true
	p.leftLocked(h)
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
	Health           Health `json:"health"`
	// Models are the models the host serves; nil when not known.
	Models []string `json:"models"`
	// Remote is the backend's last report of its queue, and ExternalLoad
	// what the requests in it beyond this picker's add to the host's score.
	Remote       Remote `json:"remote"`
	ExternalLoad int64  `json:"external_load"`
	// Removed says the host left the fleet (SetHosts) and is listed only
	// until its requests in flight end.
	Removed bool `json:"removed,omitempty"`
	// Origin says where the host came from (SetOrigin): the configuration
	// file, a DNS name, a pod.
	Origin
}

// Hosts returns a consistent snapshot of every host's load, in configuration
// order, then the removed hosts with requests still in flight.
func (p *Picker) Hosts() []HostLoad {
	p.mu.Lock()
	defer p.mu.Unlock()
	all := append(slices.Clone(p.hosts), p.gone...)
	out := make([]HostLoad, len(all))
	for i, h := range all {
		out[i] = HostLoad{Address: h.addr, InFlightTokens: h.tokens, PrefillingTokens: h.prefilling, Load: h.load,
			InFlightRequests: h.requests, DecodingRequests: h.decoding, Picks: h.picks,
			Health: h.health, Remote: h.remote, ExternalLoad: h.external, Removed: h.removed, Origin: h.origin}
		if h.models != nil {
			out[i].Models = slices.Sorted(maps.Keys(h.models))
		}
	}
	return out
}

// Models returns the models the hosts serve, sorted, each once: every
// model a request can be routed for, which is every host's, healthy or not
// (a model whose hosts are all unhealthy still goes to one of them, as
// picks fall back to unhealthy hosts). ok is false when no host's list is
// known (model discovery is off, or has not answered yet); a host whose
// list is not known adds nothing.
func (p *Picker) Models() (models []string, ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	set := map[string]bool{}
	for _, h := range p.hosts {
		if h.models == nil {
			continue
		}
		ok = true
		for m := range h.models {
			set[m] = true
		}
	}
	return slices.Sorted(maps.Keys(set)), ok
}

// Stats are the ledger's lifetime counters.
type Stats struct {
	Releases      map[Cause]uint64
	SweptTokens   int64
	RejectedPicks uint64
	OpenLeases    int
	// UnknownModels counts picks refused because no host serves the model.
	UnknownModels uint64
	// NotInSubset counts picks refused because no host of their subset
	// hint could take them.
	NotInSubset uint64
	// PanicPicks counts picks made among unhealthy hosts, none being
	// healthy.
	PanicPicks uint64
	// Affinity counts what prefix affinity did, by result.
	Affinity map[AffinityResult]uint64
}

// Stats returns a snapshot of the ledger's counters.
func (p *Picker) Stats() Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := Stats{Releases: maps.Clone(p.releases), SweptTokens: p.sweptTokens,
		RejectedPicks: p.rejectedPicks, OpenLeases: len(p.leases), UnknownModels: p.unknownModels, NotInSubset: p.subsetMisses,
		PanicPicks: p.panicPicks, Affinity: maps.Clone(p.affinity)}
	return s
}
