// Package cost says what a request costs each backend host, in expected
// microseconds of the host's work, and learns from finished requests to say
// it better.
//
// A continuous-batching server (vLLM, SGLang) spends a request's prompt once,
// in prefill, and then holds a decode slot and KV memory for it until its
// last token. The cost follows that in two parts:
//
//	prefill = prompt tokens × host's token ratio × host's seconds per prefill token
//	decode  = expected output tokens × host's seconds per output token × DecodeWeight
//
// The picker releases the prefill part at the first response token and the
// decode part at the end. DecodeWeight scales the decode part down to what it
// costs other requests: a decoding sequence adds a little to every batch step
// of its host, while a prefill in front of a request delays it fully.
//
// Three pieces learn, and each can be switched off:
//   - TwoPhase: off charges both parts until the end of the response.
//   - EstimateOutput: learn each model's and route's output length from the
//     usage responses report, as a decaying average with a prior, capped by
//     the request's max_tokens; off uses the cap, or the prior without one.
//   - Calibrate: learn each host's ratio between the prompt tokens it reports
//     and tokenlb's count, its seconds per prefill token (from time to first
//     token) and its seconds per output token (from the rest of the
//     response), so that a slower or differently tokenizing host is charged
//     what it will take; off uses the priors for every host.
package cost

import (
	"math"
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
	// to its host; 0 charges prompts only.
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

	mu      sync.Mutex
	fleet   hostSpeed // every host's observations together
	hosts   map[string]*hostSpeed
	outputs map[string]*average
}

// hostSpeed is what Calibrate learns about a host, as running averages of
// logarithms: ratios and speeds are positive and their errors multiplicative,
// so one wild sample moves the estimate by a factor, not to a wild value.
type hostSpeed struct {
	logRatio, logPrefill, logDecode average
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
	return &Estimator{opts: opts, alpha: 1 / float64(opts.Memory),
		hosts: make(map[string]*hostSpeed), outputs: make(map[string]*average)}
}

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
func (e *Estimator) Cost(r Request, output int) picker.Cost {
	return func(host string) picker.Charge {
		ratio, prefill, decode := e.speed(host)
		pre := float64(r.PromptTokens) * ratio * prefill * 1e6
		dec := float64(output) * decode * e.opts.DecodeWeight * 1e6
		c := picker.Charge{Tokens: int64(r.PromptTokens)}
		if e.opts.TwoPhase {
			c.UntilFirstToken, c.UntilEnd = int64(pre), int64(dec)
		} else {
			c.UntilEnd = int64(pre + dec)
		}
		return c
	}
}

// speed returns a host's tokens ratio, seconds per prefill token and seconds
// per output token: learned with Calibrate, else the priors.
func (e *Estimator) speed(host string) (ratio, prefill, decode float64) {
	ratio, prefill, decode = 1, 1/e.opts.PrefillTokensPerSecond, 1/e.opts.DecodeTokensPerSecond
	if !e.opts.Calibrate {
		return ratio, prefill, decode
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	// A host's prior is the fleet's average, whose prior is the configured
	// one: a host nobody has measured yet is assumed typical, not as fast
	// as the configured guess, so that measuring one host first does not
	// make it look better (or worse) than the rest.
	w := priorWeight * e.alpha
	f := &e.fleet
	lr, lp, ld := f.logRatio.value(0, w), f.logPrefill.value(math.Log(prefill), w), f.logDecode.value(math.Log(decode), w)
	if h, ok := e.hosts[host]; ok {
		lr, lp, ld = h.logRatio.value(lr, w), h.logPrefill.value(lp, w), h.logDecode.value(ld, w)
	}
	return math.Exp(lr), math.Exp(lp), math.Exp(ld)
}

// Outcome is what one finished request showed.
type Outcome struct {
	Host    string
	Request Request
	// Ahead is tokenlb's count of prompt tokens that were waiting for
	// their first token on the host when the request was routed.
	Ahead int64
	// TTFT is the time from routing to the first token; 0 when not seen.
	TTFT time.Duration
	// Duration is the time from routing to the end of the response.
	Duration time.Duration
	// PromptTokens and OutputTokens are the backend's usage report; 0
	// when it sent none. Output tokens may be counted from the stream
	// instead when usage is missing.
	PromptTokens, OutputTokens int
}

// Learn folds a finished request into the learned averages.
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
		h = &hostSpeed{}
		e.hosts[o.Host] = h
	}
	// The fleet average learns at the same pace per host as each host
	// does: its observations come len(hosts) times as often.
	fa := e.alpha / float64(len(e.hosts))
	ratio := 1.0
	if o.PromptTokens > 0 {
		ratio = clamp(float64(o.PromptTokens)/float64(o.Request.PromptTokens), 0.25, 4)
		h.logRatio.add(math.Log(ratio), e.alpha)
		e.fleet.logRatio.add(math.Log(ratio), fa)
	}
	if o.TTFT > 0 {
		// The first token comes once the host has prefilled what was
		// queued ahead and this prompt (in its own tokens).
		// A short prefill says little of the host's speed: its time to
		// first token is mostly a decode step and the network. Each
		// observation counts in proportion to its work, up to
		// prefillWorkFull tokens, so that a host sent many short prompts
		// does not look slow.
		work := float64(o.Ahead+int64(o.Request.PromptTokens)) * ratio
		x := math.Log(clamp(o.TTFT.Seconds()/work, 1e-8, 1))
		share := min(work/prefillWorkFull, 1)
		h.logPrefill.add(x, e.alpha*share)
		e.fleet.logPrefill.add(x, fa*share)
		if o.OutputTokens > 1 && o.Duration > o.TTFT {
			per := (o.Duration - o.TTFT).Seconds() / float64(o.OutputTokens-1)
			x := math.Log(clamp(per, 1e-6, 10))
			h.logDecode.add(x, e.alpha)
			e.fleet.logDecode.add(x, fa)
		}
	}
}

// prefillWorkFull is how many tokens of prefill make a full observation of
// a host's prefill speed.
const prefillWorkFull = 1024

func clamp(x, lo, hi float64) float64 { return min(max(x, lo), hi) }

// HostSpeed is what the estimator believes of a host.
type HostSpeed struct {
	Address string `json:"address"`
	// TokenRatio is the host's prompt tokens per tokenlb token.
	TokenRatio float64 `json:"token_ratio"`
	// PrefillTokensPerSecond and DecodeTokensPerSecond are its speeds, in
	// its own tokens.
	PrefillTokensPerSecond float64 `json:"prefill_tokens_per_second"`
	DecodeTokensPerSecond  float64 `json:"decode_tokens_per_second"`
}

// Speed returns what the estimator believes of host.
func (e *Estimator) Speed(host string) HostSpeed {
	ratio, prefill, decode := e.speed(host)
	return HostSpeed{Address: host, TokenRatio: ratio, PrefillTokensPerSecond: 1 / prefill, DecodeTokensPerSecond: 1 / decode}
}
