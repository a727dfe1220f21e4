// Package cost says what a request costs each backend host and learns
// from finished requests to say it better.
//
// A continuous-batching server (vLLM, SGLang) spends a request's prompt once,
// in prefill, and then holds a decode slot and KV memory for it until its
// last token. The cost follows that in two parts, in expected microseconds:
//
//	prefill = prompt tokens × host's token ratio × host's seconds per prefill token
//	decode  = expected output tokens × host's seconds per output token × DecodeWeight
//
// The picker releases the prefill part at the first response token and the
// decode part at the end. DecodeWeight scales the decode part down to what it
// costs other requests.
//
// Three pieces learn, and each can be switched off:
//   - TwoPhase: off charges both parts until the end of the response.
//   - EstimateOutput: learn each model's and route's output length from the
//     usage responses report, as a decaying average with a prior, capped by
//     the request's max_tokens; off uses the cap, or the prior without one.
//   - Calibrate: learn each host's ratio between the prompt tokens it reports
//     and tokenlb's count, its seconds per output token, and its regime
//     (regime.go): how its time to first token follows from what is already
//     there. The cost then predicts each request's time to first token on
//     each host (Charge.Wait) and weighs the parts by what the host showed
//     them to delay others; off uses the priors for every host, and predicts
//     nothing.
package cost

import (
	"math"
	"slices"
	"sync"
	"time"

	"github.com/tokenlb/tokenlb/picker"
)

// Defaults for Options left zero.
const (
	// DefaultPrefillTokensPerSecond and DefaultDecodeTokensPerSecond are the
	// priors for a host's speed: an 8B model on one modern GPU, prefilling
	// about 20,000 tokens/s and decoding about 100 tokens/s per sequence in
	// a moderately full batch.
	DefaultPrefillTokensPerSecond = 20000
	DefaultDecodeTokensPerSecond  = 100
	// DefaultDecodeWeight is the share of a decoding second charged to its
	// host, chosen by make bench (see bench/RESULTS.md).
	DefaultDecodeWeight = 0.1
	// DefaultOutputTokens is the prior for a model's output length.
	DefaultOutputTokens = 256
	// DefaultMemory is how many observations the learned averages remember:
	// each new one weighs 1/DefaultMemory.
	DefaultMemory = 50
	// maxOutputKeys bounds the learned output lengths, whose keys (model
	// names) come from clients.
	maxOutputKeys = 1024
)

// Options configure an Estimator. Booleans are pieces of the cost model; the zero
// Options is the simplest model: prompt tokens and prior output held until
// the end, nothing learned.
type Options struct {
	TwoPhase       bool
	EstimateOutput bool
	Calibrate      bool
	// DecodeWeight is the share of a request's expected decode time charged
	// to its host; 0 charges prompts only. With Calibrate it is only the
	// prior of what each host's regime shows decoding requests to delay.
	DecodeWeight float64
	// PrefillTokensPerSecond, DecodeTokensPerSecond and OutputTokens are
	// the priors; 0 means the default.
	PrefillTokensPerSecond float64
	DecodeTokensPerSecond  float64
	OutputTokens           int
	// Memory is how many observations a learned average remembers; 0 means
	// DefaultMemory.
	Memory int
}

// Estimator computes costs and learns from finished requests. It is safe for
// concurrent use.
type Estimator struct {
	opts  Options
	alpha float64 // weight of a new observation
	keep  float64 // what an old observation of a regime keeps of its weight

	mu      sync.Mutex
	fleet   hostSpeed // every host's observations together
	hosts   map[string]*hostSpeed
	outputs map[string]*average
	prior   regimes // the regime the configured priors describe, for any slots
	ownSize average // the prompt tokens a host prefills, in thousands
}

// hostSpeed is what Calibrate learns about a host: its token ratio and
// decode speed, as running averages of logarithms (ratios and speeds are
// positive and their errors multiplicative, so one wild sample moves the
// estimate by a factor, not to a wild value), its regime, and how wrong its
// predictions of time to first token were.
type hostSpeed struct {
	logRatio, logDecode average
	regimes             regimes
	errors              errorWindow
	idleErrors          errorWindow // of predictions as if the host were idle (the fleet's only)
	// cacheTrust is how much of the prompt share the prefix table says the
	// host holds its cache held (cached tokens over that share, as it
	// reports them): it evicts what the table still remembers, or holds
	// what others sent it. unseenCache is the share of a prompt its cache
	// held when the table knew of none (common system prompts, other
	// routers' requests, affinity off).
	cacheTrust, unseenCache average
	// typicalTTFT is its typical time to first token (seconds).
	typicalTTFT average
	// ownErr and fleetErr are how far its own fit and the fleet's predicted
	// its requests (faded mean squared relative errors, each scored before
	// it fitted the request).
	ownErr, fleetErr float64
}

type average struct {
	sum, weight float64 // decayed sum and weight of observations
	faded       float64 // how much of the prior's weight has decayed away
}

// add folds x into the average with weight alpha for the newest.
func (a *average) add(x, alpha float64) {
	a.sum = a.sum*(1-alpha) + x*alpha
	a.weight = a.weight*(1-alpha) + alpha
	a.faded = 1 - (1-a.faded)*(1-alpha)
}

// value blends the observations with prior, which starts out worth
// priorWeight (in units of alpha: so many observations) and decays like an
// old observation, so that it only matters until there are observations.
func (a *average) value(prior, priorWeight float64) float64 {
	w := priorWeight * (1 - a.faded)
	if a.weight+w == 0 {
		return prior
	}
	return (a.sum + prior*w) / (a.weight + w)
}

// New returns an Estimator with opts, defaults filled in.
func New(opts Options) *Estimator {
	if opts.PrefillTokensPerSecond <= 0 {
		opts.PrefillTokensPerSecond = DefaultPrefillTokensPerSecond
	}
	if opts.DecodeTokensPerSecond <= 0 {
		opts.DecodeTokensPerSecond = DefaultDecodeTokensPerSecond
	}
	if opts.OutputTokens <= 0 {
		opts.OutputTokens = DefaultOutputTokens
	}
	if opts.Memory <= 0 {
		opts.Memory = DefaultMemory
	}
	e := &Estimator{opts: opts, alpha: 1 / float64(opts.Memory), keep: 1 - 1/float64(regimeMemory*opts.Memory),
		hosts: make(map[string]*hostSpeed), outputs: make(map[string]*average)}
	// The prior regime is the fixed model's: prefills one after another at
	// the prior speed, decoding delaying others by DecodeWeight.
	own := 1000 / opts.PrefillTokensPerSecond
	for k := range e.prior.fits {
		th := &e.prior.fits[k].theta
		th[featOwn], th[featAhead], th[featDecode] = own, own, opts.DecodeWeight
	}
	e.fleet.regimes = newRegimes(&e.prior)
	return e
}

// regimeMemory is how many times Memory observations a regime's fit
// remembers: it fits seven coefficients, where an average fits one.
const regimeMemory = 4

// Options returns the estimator's options with defaults filled in.
func (e *Estimator) Options() Options { return e.opts }

// Request is what the estimator needs to know of a request.
type Request struct {
	Model string // the request's model field
	Route string // its API route (chat, completions, ...)
	// PromptTokens is tokenlb's count of the prompt.
	PromptTokens int
	// MaxOutputTokens is the request's cap on output (max_tokens and its
	// variants); 0 when it sets none.
	MaxOutputTokens int
}

// priorWeight is how many observations' worth the priors count: a handful,
// so that a few real observations outweigh them.
const priorWeight = 4

// Output returns the expected output tokens of r.
func (e *Estimator) Output(r Request) int {
	est := e.opts.OutputTokens
	if e.opts.EstimateOutput {
		e.mu.Lock()
		if a, ok := e.outputs[outputKey(r)]; ok {
			est = int(math.Round(a.value(float64(est), priorWeight*e.alpha)))
		}
		e.mu.Unlock()
	}
	if r.MaxOutputTokens > 0 && (est > r.MaxOutputTokens || !e.opts.EstimateOutput) {
		// A cap bounds the estimate; without learning, the cap is all
		// there is to go on.
		est = r.MaxOutputTokens
	}
	return est
}

func outputKey(r Request) string { return r.Route + "\x00" + r.Model }

// Cost returns r's cost on each host, for picker.Pick. output is the expected
// output length (from Output).
//
// Without Calibrate, a host is charged its prefill and DecodeWeight of its
// decode at the priors, and nothing is predicted. With it, each host's
// regime predicts the request's time to first token there from the host's
// state (Charge.Wait), and charges what the regime shows the request will
// delay the requests after it: its prefill by how much queued prefill
// delays a new one there, its decode by how much running requests do,
// and, for as long as it runs, the slowdown one more request in flight
// brings a typical prompt.
func (e *Estimator) Cost(r Request, output int) picker.Cost {
	return func(st picker.HostState) picker.Charge {
		ratio, decodePerToken := e.speed(st.Addr)
		decode := float64(output) * decodePerToken // seconds
		c := picker.Charge{Tokens: int64(r.PromptTokens), Decode: int64(decode * 1e6)}
		var pre, dec float64 // seconds
		if e.opts.Calibrate {
			v := e.regimeOf(st.Addr)
			own := float64(r.PromptTokens) * ratio * (1 - v.cached(st.PrefixShare)) / 1000
			x := features4(own, st)
			x[featQueue] = queued(v.slots, st.Requests)
			c.Wait = max(1, int64(min(predict(v.theta, x), maxWait)*1e6))
			c.Uncached = int64(own * 1000)
			// What it will delay the requests after it: its prefill, queued
			// ahead of theirs; and for as long as it runs, its decode, what
			// one more request in flight adds (to a typical prompt's
			// prefill, and whatever the prompt), and, past the slots, the
			// wait for its own.
			pre = v.theta[featAhead] * own
			dec = v.theta[featDecode]*decode + v.theta[featCrowd]*v.typical + v.theta[featBusy]
			if v.slots > 0 && st.Requests+1 >= int64(v.slots) {
				dec += v.theta[featQueue]
			}
		} else {
			pre = float64(r.PromptTokens) * ratio / e.opts.PrefillTokensPerSecond
			dec = decode * e.opts.DecodeWeight
		}
		if e.opts.TwoPhase {
			c.UntilFirstToken, c.UntilEnd = int64(pre*1e6), int64(dec*1e6)
		} else {
			c.UntilEnd = int64((pre + dec) * 1e6)
		}
		return c
	}
}

// features4 returns the regime's features for a request of own thousand
// prompt tokens (the host's, uncached) arriving at a host in state st, but
// for the queue, which depends on the slots.
func features4(own float64, st picker.HostState) [features]float64 {
	var x [features]float64
	x[featBase] = 1
	x[featOwn] = own
	x[featCrowd] = own * float64(st.Requests)
	x[featBusy] = float64(st.Requests)
	x[featAhead] = float64(st.Uncached) / 1000
	x[featDecode] = float64(st.Decode) / 1e6
	return x
}

// predict returns theta's time to first token for x, in seconds.
func predict(theta, x [features]float64) float64 {
	var y float64
	for i := range features {
		y += theta[i] * x[i]
	}
	return max(0, y)
}

// speed returns a host's tokens ratio and seconds per output token: learned
// with Calibrate, else the priors.
func (e *Estimator) speed(host string) (ratio, decode float64) {
	ratio, decode = 1, 1/e.opts.DecodeTokensPerSecond
	if !e.opts.Calibrate {
		return ratio, decode
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	// A host's prior is the fleet's average, whose prior is the configured
	// one: a host nobody has measured yet is assumed typical, not as fast
	// as the configured guess, so that measuring one host first does not
	// make it look better (or worse) than the rest.
	w := priorWeight * e.alpha
	f := &e.fleet
	lr, ld := f.logRatio.value(0, w), f.logDecode.value(math.Log(decode), w)
	if h, ok := e.hosts[host]; ok {
		lr, ld = h.logRatio.value(lr, w), h.logDecode.value(ld, w)
	}
	return math.Exp(lr), math.Exp(ld)
}

// hostView is what the cost uses of what is known of a host.
type hostView struct {
	slots   int               // how many requests it runs at once (0: no limit)
	theta   [features]float64 // its regime's fit for those slots
	typical float64           // the typical prompt a host prefills, in thousands of tokens
	trust   float64           // how far its cache bears out the prefix table (1: fully)
	unseen  float64           // the share of a prompt its cache holds when the table knows of none
	own     bool              // the regime is the host's own fit, not the fleet's
}

// cached returns the share of a prompt the host's cache is expected to
// hold, given the share the prefix table says it served.
func (v hostView) cached(share float64) float64 {
	if share > 0 {
		return min(1, share*v.trust)
	}
	return v.unseen
}

// maxWait bounds a predicted time to first token (seconds).
const maxWait = 10 * maxTTFT

// regimeOf returns what is known of a host (the fleet's, while nothing is
// of the host itself).
func (e *Estimator) regimeOf(host string) hostView {
	e.mu.Lock()
	defer e.mu.Unlock()
	h, ok := e.hosts[host]
	if !ok {
		h = &e.fleet
	}
	return e.viewLocked(h)
}

// viewLocked returns what is known of h (the fleet, or one host), with e
// locked. A host's slots are the fleet's unless its own observations
// clearly say otherwise (regimes.add): how many requests a host runs at
// once is the engine's setting, the same across a fleet as a rule, and the
// fleet's observations tell it far sooner than one host's.
func (e *Estimator) viewLocked(h *hostSpeed) hostView {
	w := priorWeight * e.alpha
	v := hostView{unseen: e.fleet.unseenCache.value(0, w), typical: e.ownSize.value(0, 0), trust: e.trust(h)}
	if h != &e.fleet {
		v.unseen = h.unseenCache.value(v.unseen, w)
	}
	// A host's regime is the fleet's unless its own fit has predicted its
	// requests clearly better: the hosts of one fleet run the same engine
	// as a rule, and a fit of their own would only add the noise of fewer
	// observations; a host that differs (slower hardware, another engine)
	// shows it.
	if h == &e.fleet || h.regimes.seen < minChoose || h.ownErr >= ownGain*h.fleetErr {
		v.slots, v.theta = e.fleet.regimes.current()
		return v
	}
	v.slots, v.theta = h.regimes.current()
	v.own = true
	return v
}

// ownGain is how much smaller the error of a host's own fit must be than
// that of the fleet's for the host to be believed to differ.
const ownGain = 0.8

// trust returns how far h's cache bears out the prefix table, from the
// fleet's (and at first, fully).
func (e *Estimator) trust(h *hostSpeed) float64 {
	w := priorWeight * e.alpha
	fleet := e.fleet.cacheTrust.value(1, w)
	if h == &e.fleet {
		return fleet
	}
	return h.cacheTrust.value(fleet, w)
}

// Outcome is what one finished request showed.
type Outcome struct {
	Host    string
	Request Request
	// State is the host's state the request was priced on.
	State picker.HostState
	// Predicted is the time to first token the cost predicted on the host
	// (Charge.Wait); 0 when it predicted none.
	Predicted time.Duration
	// TTFT is the time from routing to the first token; 0 when not seen.
	TTFT time.Duration
	// Duration is the time from routing to the end of the response.
	Duration time.Duration
	// PromptTokens and OutputTokens are the backend's usage report; 0
	// when it sent none. Output tokens may be counted from the stream
	// instead when usage is missing. CachedTokens are the prompt tokens
	// its prefix cache held, when it says (-1 when it does not).
	PromptTokens, OutputTokens, CachedTokens int
}

// Learn folds a finished request into the learned averages and regimes.
func (e *Estimator) Learn(o Outcome) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if o.OutputTokens > 0 && e.opts.EstimateOutput {
		k := outputKey(o.Request)
		a, ok := e.outputs[k]
		if !ok && len(e.outputs) < maxOutputKeys {
			a = &average{}
			e.outputs[k] = a
		}
		if a != nil {
			a.add(float64(o.OutputTokens), e.alpha)
		}
	}
	if !e.opts.Calibrate || o.Request.PromptTokens <= 0 {
		return
	}
	h, ok := e.hosts[o.Host]
	if !ok {
		h = &hostSpeed{regimes: newRegimes(&e.fleet.regimes)}
		e.hosts[o.Host] = h
	}
	// The fleet average learns at the same pace per host as each host
	// does: its observations come len(hosts) times as often.
	fa := e.alpha / float64(len(e.hosts))
	if o.PromptTokens > 0 {
		ratio := clamp(float64(o.PromptTokens)/float64(o.Request.PromptTokens), 0.25, 4)
		h.logRatio.add(math.Log(ratio), e.alpha)
		e.fleet.logRatio.add(math.Log(ratio), fa)
	}
	if o.TTFT <= 0 {
		return
	}
	if o.OutputTokens > 1 && o.Duration > o.TTFT {
		per := (o.Duration - o.TTFT).Seconds() / float64(o.OutputTokens-1)
		x := math.Log(clamp(per, 1e-6, 10))
		h.logDecode.add(x, e.alpha)
		e.fleet.logDecode.add(x, fa)
	}
	if o.Predicted > 0 {
		y := o.TTFT.Seconds()
		err := math.Abs(o.Predicted.Seconds()-y) / y
		h.errors.add(err)
		e.fleet.errors.add(err)
		// What a prediction that ignored the host's state (as if it were
		// idle) would have been off by: the yardstick of Spread.
		v := e.viewLocked(h)
		ratio := math.Exp(h.logRatio.value(e.fleet.logRatio.value(0, priorWeight*e.alpha), priorWeight*e.alpha))
		own := float64(o.Request.PromptTokens) * ratio * (1 - v.cached(o.State.PrefixShare)) / 1000
		idle := predict(v.theta, features4(own, picker.HostState{}))
		e.fleet.idleErrors.add(math.Abs(idle-y) / y)
	}
	e.learnRegime(h, o)
}

// learnRegime fits the host's regime, and the fleet's, to one more time to
// first token.
func (e *Estimator) learnRegime(h *hostSpeed, o Outcome) {
	ratio := math.Exp(h.logRatio.value(e.fleet.logRatio.value(0, priorWeight*e.alpha), priorWeight*e.alpha))
	// The prompt the host prefilled: its own count less what its cache
	// held, when it reports both; else tokenlb's count at the host's ratio,
	// less the share it was believed to hold.
	own := float64(o.Request.PromptTokens) * ratio * (1 - e.viewLocked(h).cached(o.State.PrefixShare))
	if o.PromptTokens > 0 && o.CachedTokens >= 0 {
		own = float64(max(0, o.PromptTokens-o.CachedTokens))
		share := float64(o.CachedTokens) / float64(o.PromptTokens)
		if o.State.PrefixShare > 0 {
			held := share / o.State.PrefixShare
			h.cacheTrust.add(clamp(held, 0, maxTrust), e.alpha)
			e.fleet.cacheTrust.add(clamp(held, 0, maxTrust), e.alpha/float64(len(e.hosts)))
		} else {
			h.unseenCache.add(clamp(share, 0, 1), e.alpha)
			e.fleet.unseenCache.add(clamp(share, 0, 1), e.alpha/float64(len(e.hosts)))
		}
	}
	x := features4(own/1000, o.State)
	y := min(o.TTFT.Seconds(), maxTTFT)
	e.ownSize.add(own/1000, e.alpha)
	// Each observation weighs inversely to its time to first token, around
	// the typical one of the fit it goes into (so that a fit's weights are
	// about 1 on average, against its prior's): the fit is after relative
	// accuracy, so that the short requests are predicted as well as the
	// long ones, whose squared errors would otherwise make the whole of it.
	weight := func(typical *average) float64 {
		typical.add(y, e.alpha)
		return clamp(typical.value(y, 0)/max(y, 1e-3), 0.1, 10)
	}
	n := o.State.Requests
	// Score the host's own fit and the fleet's on this observation before
	// either sees it (see viewLocked).
	rel := func(r *regimes) float64 {
		slots, theta := r.current()
		x := x
		x[featQueue] = queued(slots, n)
		d := (predict(theta, x) - y) / max(y, 1e-3)
		return d * d
	}
	h.ownErr = h.ownErr*e.keep + rel(&h.regimes)*(1-e.keep)
	h.fleetErr = h.fleetErr*e.keep + rel(&e.fleet.regimes)*(1-e.keep)
	e.fleet.regimes.add(x, n, y, weight(&e.fleet.typicalTTFT), 1-(1-e.keep)/float64(len(e.hosts)), &e.prior, 0, 0)
	h.regimes.add(x, n, y, weight(&h.typicalTTFT), e.keep, &e.fleet.regimes, hostPool, e.fleet.regimes.chosen)
}

// maxTrust bounds one observation of a host's cache trust: the prefix
// table keeps only some of a prompt's blocks (1, 2, 4, ... and the last),
// so the share it finds served can be well under what is shared.
const maxTrust = 3

// maxTTFT bounds one observation's time to first token (seconds), so that
// a request stuck for a reason the regime does not model (a host hanging)
// cannot drag the fit far.
const maxTTFT = 600

func clamp(x, lo, hi float64) float64 { return min(max(x, lo), hi) }

// HostSpeed is what the estimator believes of a host.
type HostSpeed struct {
	Address string `json:"address"`
	// TokenRatio is the host's prompt tokens per tokenlb token.
	TokenRatio float64 `json:"token_ratio"`
	// PrefillTokensPerSecond and DecodeTokensPerSecond are its speeds, in
	// its own tokens (the prefill speed is the regime's own coefficient).
	PrefillTokensPerSecond float64 `json:"prefill_tokens_per_second"`
	DecodeTokensPerSecond  float64 `json:"decode_tokens_per_second"`
	// Regime is its learned regime (regime.go), by coefficient, with
	// Calibrate; Slots how many requests it runs at once before others
	// wait (0: no limit seen); Observations how many times to first token
	// it was fitted to.
	Regime       map[string]float64 `json:"regime,omitempty"`
	Slots        int                `json:"slots"`
	Observations int                `json:"observations,omitempty"`
	// CacheTrust is how much of the prompt share the prefix table says it
	// holds its cache did hold, as it reported (1: all of it).
	CacheTrust float64 `json:"cache_trust"`
	// OwnRegime says Regime is the host's own fit; otherwise it is the
	// fleet's, which predicts the host's requests about as well.
	OwnRegime bool `json:"own_regime"`
	// PredictionError is the median of |predicted - observed| / observed
	// time to first token over its last requests; Predictions how many.
	PredictionError float64 `json:"ttft_prediction_error"`
	Predictions     int     `json:"ttft_predictions"`
}

// Forget drops what was learned of host alone (it left the fleet); what it
// taught the fleet's regime and output lengths stays.
func (e *Estimator) Forget(host string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	delete(e.hosts, host)
}

// Speed returns what the estimator believes of host.
func (e *Estimator) Speed(host string) HostSpeed {
	ratio, decode := e.speed(host)
	s := HostSpeed{Address: host, TokenRatio: ratio, DecodeTokensPerSecond: 1 / decode,
		PrefillTokensPerSecond: e.opts.PrefillTokensPerSecond}
	if !e.opts.Calibrate {
		return s
	}
	v := e.regimeOf(host)
	slots, theta := v.slots, v.theta
	s.Slots, s.CacheTrust, s.OwnRegime = slots, v.trust, v.own
	if theta[featOwn] > 0 {
		s.PrefillTokensPerSecond = 1000 / theta[featOwn]
	}
	s.Regime = make(map[string]float64, features)
	for i, name := range featureNames {
		s.Regime[name] = theta[i]
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if h, ok := e.hosts[host]; ok {
		s.Observations = h.regimes.seen
		s.PredictionError, s.Predictions = h.errors.median(), h.errors.n
	}
	return s
}

// Spread returns how far apart, relative to the lowest, hosts' scores must
// be to be told apart, for the picker's Request.Spread: the fleet's recent
// median prediction error e, scaled down by how much better than a
// prediction that ignores the hosts' state (as if idle) the predictions
// were: e·min(1, e/e_idle)². A model whose use of the hosts' state shows
// in its predictions ranks hosts by it even when single predictions are
// noisy; one that predicts no better than ignoring the state leaves the
// choice between hosts within its error to least-request. Before enough
// predictions were checked it is 0: the prior is the fixed model, which
// ranks hosts by their load, and a fleet that never shows a first token
// (no streamed responses) keeps it.
func (e *Estimator) Spread() float64 {
	if !e.opts.Calibrate {
		return 0
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.fleet.errors.n < errorWindowSize/4 {
		return 0
	}
	m, idle := e.fleet.errors.median(), e.fleet.idleErrors.median()
	skill := 1.0
	if idle > 0 {
		skill = min(1, m/idle)
	}
	return m * skill * skill
}

// errorWindowSize is how many recent prediction errors a window keeps.
const errorWindowSize = 64

// errorWindow keeps the last errorWindowSize prediction errors.
type errorWindow struct {
	errs [errorWindowSize]float64
	n    int // errors added, up to the window's size
	next int
}

func (w *errorWindow) add(err float64) {
	w.errs[w.next] = err
	w.next = (w.next + 1) % errorWindowSize
	w.n = min(w.n+1, errorWindowSize)
}

// median returns the window's median error, 0 when empty.
func (w *errorWindow) median() float64 {
	if w.n == 0 {
		return 0
	}
	s := slices.Clone(w.errs[:w.n])
	slices.Sort(s)
	return s[len(s)/2]
}
