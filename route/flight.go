package route

import (
	"context"
	"log/slog"
	"math"
	"math/rand/v2"
	"strconv"
	"sync"
	"time"

	"github.com/tokenlb/tokenlb/backend"
	"github.com/tokenlb/tokenlb/cost"
	"github.com/tokenlb/tokenlb/llmapi"
	"github.com/tokenlb/tokenlb/picker"
	"github.com/tokenlb/tokenlb/processor"
)

// tailBytes is how much of a response's end is kept to find its usage.
const tailBytes = 16 << 10

// Why a lease was released, by how its response ended: the values of
// tokenlb_releases_total's cause label, besides the picker's own
// picker.Swept.
const (
	ReleasedAtHeaders picker.Cause = "response_headers"   // the backend answered, no body to follow (or none shown)
	ReleasedAtEnd     picker.Cause = "response_end"       // the response body (or its trailers) ended
	ReleasedStreamEnd picker.Cause = "stream_end"         // the stream ended first (client abort, reset, error)
	ReleasedRejected  picker.Cause = "immediate_response" // tokenlb answered the client itself
	ReleasedClosed    picker.Cause = "request_closed"     // the end stream closed: the response ended (or was abandoned) past its first token
)

// Causes lists every release cause, for metrics that show each from the
// start.
var Causes = []picker.Cause{ReleasedAtHeaders, ReleasedAtEnd, ReleasedStreamEnd, ReleasedRejected, ReleasedClosed, picker.Swept}

// causeOf names the release cause of each way a response ends, and says
// whether the response was seen as far as anyone will see it (its end, or
// its headers when no stream shows its body): only such a response teaches
// the cost estimator.
func causeOf(how processor.Ending) (cause picker.Cause, seen bool) {
	switch how {
	case processor.ResponseEnded:
		return ReleasedAtEnd, true
	case processor.HeadersOnly:
		return ReleasedAtHeaders, true
	case processor.Rejected:
		return ReleasedRejected, false
	case processor.Closed:
		return ReleasedClosed, false
	}
	return ReleasedStreamEnd, false
}

// flight follows one routed request to its end: it releases the prefill
// part of the lease at the first token and the rest at the end, teaches the
// cost estimator what the response showed, and reports the response's
// status for passive health checks. One stream drives it (the routing
// stream, or an observer that claimed it), but both may end at once, so its
// methods lock; the first-token estimate's timer only touches the lease,
// which is safe for concurrent use.
type flight struct {
	rt    *Router
	lease *picker.Lease
	req   cost.Request

	mu sync.Mutex

	status int
	// streamed: the response is an event stream, so its first bytes are
	// its first token. A whole response's first bytes come at its end.
	streamed bool
	ttft     time.Duration
	events   int    // data events seen
	tail     []byte // the response body's last tailBytes
	// mayStop: at its first token the flight chose not to follow this
	// response to its end (Config.FollowInterval); unfollowed: the Server
	// then stopped showing it (Unfollow), so it taught its time to first
	// token then, and its end teaches nothing.
	mayStop, unfollowed bool
	timer               *time.Timer
	finished            bool
	reported            bool // the status went to Config.ResponseStatus
	// connectReported: Config.ResponseStatus was told that Envoy could not
	// connect (backend.ConnectFailure).
	connectReported bool
	// movedFrom is the chosen host when the data plane served the request
	// on another (Headers.Served): the lease moved there.
	movedFrom string
	about     about
}

// about is what the request's log line says of the request itself.
type about struct {
	requestID, path string
	api             llmapi.API
	estimated       string
}

func newFlight(rt *Router, lease *picker.Lease, req cost.Request) *flight {
	f := &flight{rt: rt, lease: lease, req: req}
	if rt.cfg.EstimateFirstToken {
		// When the cost predicted the first token, then; else when the
		// host should have prefilled what was ahead and this prompt.
		d := time.Duration(lease.Charge().Wait) * time.Microsecond
		if d <= 0 {
			hs := rt.cfg.Cost.Speed(lease.Host())
			work := float64(lease.Ahead()+int64(req.PromptTokens)) * hs.TokenRatio
			d = time.Duration(work / hs.PrefillTokensPerSecond * float64(time.Second))
		}
		f.timer = time.AfterFunc(d, func() { lease.FirstToken() })
	}
	return f
}

// Destinations returns the leased host, then up to Config.Fallbacks other
// hosts for a retry.
func (f *flight) Destinations() []string {
	return append([]string{f.lease.Host()}, f.lease.Fallbacks(f.rt.cfg.Fallbacks)...)
}

// ResponseHeaders notes the status and reports it; a response without a
// body ends here, and so does one whose body nobody will show, unless the
// first token is estimated (then the charge is held until the stream ends).
func (f *flight) ResponseHeaders(h processor.Headers, next processor.Next) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if v, ok := h.Lookup(":status"); ok {
		f.status, _ = strconv.Atoi(v)
	}
	if v, ok := h.Lookup("content-type"); ok {
		f.streamed = llmapi.IsEventStream(v)
	}
	chosen := f.lease.Host()
	if sv := h.Served(); sv != "" && f.lease.Move(sv) {
		// The data plane served it elsewhere (a retry on a fallback
		// host): the charge follows, and the chosen host failed it.
		f.rt.m.moved.Inc()
		if f.rt.cfg.ResponseStatus != nil && !f.reported {
			f.rt.cfg.ResponseStatus(chosen, 503)
		}
		f.movedFrom = chosen
	}
	f.report(h)
	switch {
	case next == processor.NoBody:
		f.finishLocked(ReleasedAtHeaders, true)
	case next == processor.BodyHidden && !f.rt.cfg.EstimateFirstToken:
		f.finishLocked(ReleasedAtHeaders, true)
	}
}

// report tells Config.ResponseStatus the response's status, once, or
// backend.ConnectFailure when Envoy says it could not connect to the host.
// The two streams that may show the headers (routing and observer) may not
// both carry Envoy's response flags: a connection failure that only the
// second shows is reported then, after the status.
func (f *flight) report(h processor.Headers) {
	if f.status == 0 || f.rt.cfg.ResponseStatus == nil {
		return
	}
	connect := h.ConnectFailed()
	if f.reported && (!connect || f.connectReported) {
		return
	}
	again := f.reported
	f.reported = true
	attempts := 1
	if v, ok := h.Lookup("x-envoy-attempt-count"); ok && f.movedFrom == "" {
		attempts, _ = strconv.Atoi(v)
	}
	_, overloaded := h.Lookup("x-envoy-overloaded")
	switch {
	case attempts > 1:
		// Envoy retried the request elsewhere (override_host's
		// fallbacks): the chosen host failed it, whatever the answer.
		// The response flags describe the last attempt, on a host not
		// named here.
		if !again {
			f.rt.cfg.ResponseStatus(f.lease.Host(), 503)
		}
	case overloaded:
		// Envoy's own circuit breaker, not the host.
	case connect:
		// Envoy's own 503: the host (where the lease is, which follows
		// the endpoint the data plane reports serving) refused or did
		// not answer the connection. Certain, unlike a 5xx of the
		// host's own, so passive ejection acts on the first.
		f.connectReported = true
		f.rt.cfg.ResponseStatus(f.lease.Host(), backend.ConnectFailure)
	default:
		f.rt.cfg.ResponseStatus(f.lease.Host(), f.status)
	}
}

// ResponseBody notes a chunk of the response body: the first bytes are the
// first token (a streamed response's first event; a whole response
// otherwise). At a successful streamed response's first token it decides
// whether to follow the response to its end (Config.FollowInterval); for
// one it does not, more says that nothing but its end is needed (Unfollow).
func (f *flight) ResponseBody(b []byte, end bool) (more bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(b) > 0 && !f.unfollowed {
		if f.ttft == 0 && f.ok() {
			f.ttft = time.Since(f.lease.Start())
			f.lease.FirstToken()
			if f.streamed {
				f.rt.m.ttft.Observe(f.ttft.Seconds())
			}
			if f.streamed && !end && !f.finished {
				f.mayStop = !f.rt.follow(f.lease.Host(), time.Now())
			}
		}
		f.events += llmapi.CountEvents(b)
		f.tail = append(f.tail, b...)
		if n := len(f.tail); n > tailBytes {
			f.tail = append(f.tail[:0], f.tail[n-tailBytes:]...)
		}
	}
	if end {
		f.finishLocked(ReleasedAtEnd, true)
	}
	return !f.mayStop && !f.finished
}

// Unfollow says the Server stopped showing the body (it asked for no more,
// ResponseBody's more): the response teaches its time to first token now,
// and its end nothing more. Until then a response the Flight chose not to
// follow is still followed whole, and teaches as any other: a routing
// stream shown the body, or an observer with no end stream to hand the end
// to, sees every chunk anyway.
func (f *flight) Unfollow() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.finished || f.unfollowed || !f.mayStop {
		return
	}
	f.unfollowed = true
	f.tail = nil
	f.rt.m.followed.WithLabelValues("first_token").Inc()
	f.learnFirstToken()
}

func (f *flight) ok() bool { return f.status == 0 || f.status/100 == 2 }

// End releases whatever the lease still holds and, for a successful
// response, teaches the cost estimator.
func (f *flight) End(how processor.Ending) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.finishLocked(causeOf(how))
}

// finishLocked releases the lease, once; seen says the response was seen
// as far as anyone will see it, so that a successful one teaches the cost
// estimator.
func (f *flight) finishLocked(cause picker.Cause, seen bool) {
	if f.finished {
		return
	}
	f.finished = true
	if f.timer != nil {
		f.timer.Stop()
	}
	if !f.lease.Release(cause) {
		return
	}
	var o *cost.Outcome
	if seen && f.ok() && !f.unfollowed {
		o = f.learn()
		if f.streamed {
			f.rt.m.followed.WithLabelValues("end").Inc()
		}
	}
	if f.ok() && f.status != 0 && cause != ReleasedStreamEnd {
		f.rt.m.duration.Observe(time.Since(f.lease.Start()).Seconds())
	}
	f.logEnd(cause, o)
}

// logEnd writes the request's line (Config.LogRequests): what was asked,
// where it went and why, and how it ended. o is what a successful response
// taught, nil for any other.
func (f *flight) logEnd(cause picker.Cause, o *cost.Outcome) {
	n := f.rt.cfg.LogRequests
	cut := cause == ReleasedStreamEnd
	failed := cut || !f.ok()
	if n <= 0 || (!failed && n > 1 && rand.IntN(n) != 0) {
		return
	}
	level, msg := slog.LevelInfo, "request"
	if f.status >= 500 {
		level = slog.LevelWarn
	}
	if cut {
		// The client went away, or the stream broke, before the end.
		msg = "request cut"
	}
	ctx := context.Background()
	if !f.rt.log.Enabled(ctx, level) { // the attributes cost allocations even when dropped
		return
	}
	attrs := make([]slog.Attr, 0, 16)
	attrs = append(attrs, slog.String("request_id", f.about.requestID), slog.String("path", f.about.path),
		slog.String("api", string(f.about.api)), slog.String("model", f.req.Model),
		slog.Int("prompt_tokens", f.req.PromptTokens))
	if f.about.estimated != "" {
		attrs = append(attrs, slog.String("estimated", f.about.estimated))
	}
	attrs = append(attrs, slog.String("host", f.lease.Host()), slog.String("why", string(f.lease.Why())))
	if f.movedFrom != "" {
		attrs = append(attrs, slog.String("chosen_host", f.movedFrom))
	}
	class := "none" // no response headers came back
	if f.status > 0 {
		class = strconv.Itoa(f.status/100) + "xx"
	}
	attrs = append(attrs, slog.Int("status", f.status), slog.String("status_class", class), slog.String("end", string(cause)))
	if f.ttft > 0 {
		attrs = append(attrs, slog.Float64("ttft_seconds", f.ttft.Seconds()))
	}
	attrs = append(attrs, slog.Float64("duration_seconds", time.Since(f.lease.Start()).Seconds()))
	if o != nil && o.OutputTokens > 0 {
		attrs = append(attrs, slog.Int("output_tokens", o.OutputTokens))
	}
	f.rt.log.LogAttrs(ctx, level, msg, attrs...)
}

// learnFirstToken teaches the cost estimator the time to first token of a
// response it will not see the end of.
func (f *flight) learnFirstToken() {
	o := f.outcome()
	o.TTFT, o.Duration = f.ttft, f.ttft
	f.teach(o)
}

// outcome is what any response teaches: where it went, what was asked and
// predicted; the rest is for the caller to fill in.
func (f *flight) outcome() cost.Outcome {
	return cost.Outcome{Host: f.lease.Host(), Request: f.req, State: f.lease.State(),
		Predicted: time.Duration(f.lease.Charge().Wait) * time.Microsecond, CachedTokens: -1}
}

// teach notes how far off the predicted time to first token was, when
// there is one to compare, and teaches the cost estimator o.
func (f *flight) teach(o cost.Outcome) {
	if o.TTFT > 0 && o.Predicted > 0 {
		f.rt.m.predictionError.WithLabelValues(o.Host).Observe(math.Abs(o.Predicted.Seconds()-o.TTFT.Seconds()) / o.TTFT.Seconds())
	}
	f.rt.cfg.Cost.Learn(o)
}

// learn teaches the cost estimator what a successful response showed, and
// returns it.
func (f *flight) learn() *cost.Outcome {
	rt := f.rt
	o := f.outcome()
	o.Duration = time.Since(f.lease.Start())
	if f.streamed {
		// Only a stream's first event times the prefill and splits the
		// response into prefill and decode: a whole response would teach
		// that prefill takes all of it and decoding no time at all.
		o.TTFT = f.ttft
	}
	if u, ok := llmapi.ParseUsage(f.tail); ok {
		o.PromptTokens, o.OutputTokens, o.CachedTokens = u.PromptTokens, u.CompletionTokens, u.CachedTokens
		rt.m.usageSeen.WithLabelValues("yes").Inc()
	} else {
		o.OutputTokens = f.events // one token per streamed event, as vLLM sends them
		rt.m.usageSeen.WithLabelValues("no").Inc()
	}
	f.teach(o)
	if rt.log.Enabled(context.Background(), slog.LevelDebug) { // the attributes cost allocations even when dropped
		rt.log.Debug("learned", "request_id", f.about.requestID, "host", o.Host,
			"ttft_seconds", o.TTFT.Seconds(), "duration_seconds", o.Duration.Seconds(),
			"prompt_tokens", o.PromptTokens, "output_tokens", o.OutputTokens, "cached_tokens", o.CachedTokens,
			"predicted_ttft_seconds", o.Predicted.Seconds(), "ahead_tokens", o.State.PrefillingTokens, "counted_tokens", f.req.PromptTokens)
	}
	return &o
}
