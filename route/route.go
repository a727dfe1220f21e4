// Package route is the life of a request in tokenlb, top to bottom. It is
// the processor's Router: the Envoy protocol (package processor) hands it a
// request and shows it the response; everything tokenlb decides happens
// here, in this order:
//
//	parse   the body as the API its path names (llmapi): model, stream, output cap
//	count   its prompt tokens (tokenizer), hashing its leading blocks on the way (prefix)
//	cost    what it will cost each host (cost): expected output, prefill and decode parts
//	pick    the host whose load after adding it is lowest, and charge it, in one step (picker)
//	fly     a flight follows the response: the first bytes of a successful body release
//	        the prefill part, the end the rest, or everything when the stream ends
//	        first; a successful response teaches the cost estimator, and each
//	        response's status goes to passive health checks (backend), unless it
//	        is Envoy's own overload answer
//
// count.go holds the first two steps, route.go the next two, flight.go the
// last.
package route

import (
	"context"
	"errors"
	"hash/maphash"
	"log/slog"
	"sync"
	"time"

	"github.com/tokenlb/tokenlb/cost"
	"github.com/tokenlb/tokenlb/llmapi"
	"github.com/tokenlb/tokenlb/picker"
	"github.com/tokenlb/tokenlb/prefix"
	"github.com/tokenlb/tokenlb/processor"
	"github.com/tokenlb/tokenlb/tokenizer"
)

// Defaults for Config fields left empty.
const (
	// DefaultRetryAfter is Config.RetryAfter's default.
	DefaultRetryAfter = time.Second
	// DefaultFollowInterval is the configuration's default for
	// Config.FollowInterval (whose zero value follows every response).
	DefaultFollowInterval = time.Second
)

// Config configures a Router.
type Config struct {
	// Picker holds the hosts and their load; Tokenizer counts prompts.
	Picker    *picker.Picker
	Tokenizer *tokenizer.Tokenizer
	// Prefix says which of a prompt's leading blocks are hashed, for the
	// picker's prefix affinity; Blocks 0 hashes none. A zero Seed is
	// replaced by a random one.
	Prefix prefix.Hashing
	// Cost prices requests per host and learns from responses; nil means
	// cost.New with zero options (prompt tokens held until the end).
	Cost *cost.Estimator
	// RetryAfter is sent with the 429 when no host has capacity.
	RetryAfter time.Duration
	// Fallbacks is how many other hosts follow the chosen one in the
	// destination list, for a proxy to retry on.
	Fallbacks int
	// EstimateFirstToken releases the prefill part when the host should
	// have prefilled the request, by the cost estimator's speed, instead
	// of waiting to see the first token (for responses tokenlb never sees).
	EstimateFirstToken bool
	// FollowInterval: a successful streamed response is followed past its
	// first token to its end, for what only the end shows (usage: output
	// length, decode speed, the host's prompt count), when its host had no
	// response followed within FollowInterval: one a host per interval at
	// most, so that the cost of following (a message a chunk) stays bounded
	// per host however busy, while a quiet host has every response
	// followed. The others teach their time to first token, and the Flight
	// asks for no more of their body, which spares a message a chunk where
	// an end stream reports the end (processor.Flight.ResponseBody). 0
	// follows every response, a negative interval none.
	FollowInterval time.Duration
	// LogRequests logs a line at info for each request tokenlb routed, when
	// its response ends (Router's doc lists its fields): 0 logs none, 1
	// every one, N one successful request in N at random and every one
	// that failed or was cut.
	LogRequests int
	// ModelRouting sends each request only to hosts that serve its model
	// (picker.Request.Model), and answers 404 when none does.
	ModelRouting bool
	// ResponseStatus, when set, is told the status of each routed request's
	// response, from its response headers, or backend.ConnectFailure when
	// Envoy says it could not connect to the host (processor.Headers
	// ConnectFailed): passive health checks (backend.Watcher.Observe) learn
	// from it which hosts fail.
	ResponseStatus func(host string, status int)
	// Logger receives per-request debug logs; nil discards them.
	Logger *slog.Logger
	// Metrics records request metrics; nil records into metrics nobody
	// registered.
	Metrics *Metrics
}

// Router routes requests; it implements processor.Router.
type Router struct {
	cfg Config
	log *slog.Logger
	m   *Metrics

	mu       sync.Mutex
	followed map[string]time.Time // when each host last had a response followed to its end
}

// New returns a Router.
func New(cfg Config) *Router {
	if cfg.Cost == nil {
		cfg.Cost = cost.New(cost.Options{})
	}
	if cfg.RetryAfter <= 0 {
		cfg.RetryAfter = DefaultRetryAfter
	}
	if cfg.Prefix.Seed == (maphash.Seed{}) {
		cfg.Prefix.Seed = maphash.MakeSeed()
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := cfg.Metrics
	if m == nil {
		m = NewMetrics()
	}
	return &Router{cfg: cfg, log: log, m: m, followed: make(map[string]time.Time)}
}

// maxFollowed bounds Router.followed: past it, hosts whose last followed
// response is older than a minute (or the interval, when longer) are
// dropped (removed hosts, as the fleet changes).
const maxFollowed = 4096

// follow says whether to follow a streamed response on host to its end,
// and if so notes it: when the host had none followed within
// Config.FollowInterval.
func (rt *Router) follow(host string, now time.Time) bool {
	if rt.cfg.FollowInterval <= 0 {
		return rt.cfg.FollowInterval == 0
	}
	rt.mu.Lock()
	defer rt.mu.Unlock()
	if last, ok := rt.followed[host]; ok && now.Sub(last) < rt.cfg.FollowInterval {
		return false
	}
	if len(rt.followed) >= maxFollowed {
		for h, last := range rt.followed {
			if now.Sub(last) > max(time.Minute, rt.cfg.FollowInterval) {
				delete(rt.followed, h)
			}
		}
	}
	rt.followed[host] = now
	return true
}

// Admit refuses, before its body is read, a request to an API path whose
// body is declared and is not JSON.
func (rt *Router) Admit(r *processor.Request) *processor.Rejection {
	if llmapi.APIFor(r.Path) != llmapi.Other && r.ContentType != "" && !llmapi.IsJSON(r.ContentType) {
		return errMediaType(r.ContentType)
	}
	return nil
}

// Route parses and counts the request, prices it on each host, picks and
// charges one, and returns the flight that follows its response.
func (rt *Router) Route(r *processor.Request) (processor.Flight, *processor.Rejection) {
	if answer, ok := rt.models(r); ok {
		return nil, answer
	}
	p, rej := rt.count(r)
	if rej != nil {
		return nil, rej
	}
	return rt.pick(r, p)
}

// pick prices the prompt on each host (its cost, by the expected output)
// and has the picker choose and charge one, in one step; the flight then
// holds the charge.
func (rt *Router) pick(r *processor.Request, p prompt) (processor.Flight, *processor.Rejection) {
	rt.m.requestTokens.WithLabelValues(string(p.API)).Observe(float64(p.Tokens))
	start := time.Now()
	req := cost.Request{Model: p.Model, Route: string(p.API), PromptTokens: p.Tokens, MaxOutputTokens: p.MaxOutputTokens}
	output := rt.cfg.Cost.Output(req)
	pr := picker.Request{Cost: rt.cfg.Cost.Cost(req, output), Prefix: p.Prefix, PrefixBlockBytes: p.BlockBytes,
		PromptBytes: p.TextBytes, Spread: rt.cfg.Cost.Spread(), Subset: r.Subset}
	if rt.cfg.ModelRouting {
		pr.Model = p.Model
	}
	lease, err := rt.cfg.Picker.Pick(pr)
	rt.m.pickSeconds.Observe(time.Since(start).Seconds())
	switch {
	case errors.Is(err, picker.ErrUnknownModel):
		return nil, errUnknownModel(p.Model)
	case errors.Is(err, picker.ErrNotInSubset):
		return nil, errNotInSubset(r.Subset)
	case err != nil:
		return nil, errNoCapacity(rt.cfg.RetryAfter)
	}
	f := newFlight(rt, lease, req)
	f.about = about{requestID: r.RequestID, path: r.Path, api: p.API, estimated: p.Estimated}
	rt.m.outputTokens.Observe(float64(output))
	if rt.log.Enabled(context.Background(), slog.LevelDebug) { // the attributes cost allocations even when dropped
		rt.log.Debug("routed", "path", r.Path, "request_id", r.RequestID, "api", p.API, "model", p.Model,
			"tokens", p.Tokens, "expected_output", output, "host", lease.Host(), "why", lease.Why())
	}
	return f, nil
}
