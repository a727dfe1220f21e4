package processor

import (
	"bytes"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"

	"github.com/tokenlb/tokenlb/cost"
	"github.com/tokenlb/tokenlb/picker"
)

// tailBytes is how much of a response's end is kept to find its usage.
const tailBytes = 16 << 10

// Who follows a request's response. The stream that routed it does until
// its response headers; by then an observer stream may have claimed it.
const (
	ownerRouter   int32 = iota // the routing stream, until the response headers
	ownerObserver              // an observer stream claimed it first
	ownerKept                  // the routing stream saw the response headers unclaimed
)

// tracker follows one routed request to its end: it releases the prefill
// part of the lease at the first token, the rest at the end, and teaches the
// cost model what the response showed. One stream drives it (the routing
// stream, or an observer that claimed it), but both may end at once, so its
// methods lock; the estimate timer only touches the lease, which is safe for
// concurrent use.
type tracker struct {
	s     *Server
	lease *picker.Lease
	req   cost.Request
	id    string // correlation id for an observer stream
	owner atomic.Int32

	mu sync.Mutex

	status int
	// streamed: the response is an event stream, so its first bytes are
	// its first token. A whole response's first bytes come at its end.
	streamed bool
	ttft     time.Duration
	events   int    // SSE data events seen
	tail     []byte // the response body's last tailBytes
	timer    *time.Timer
	finished bool
	reported bool // the status went to Config.ResponseStatus
}

func newTracker(s *Server, lease *picker.Lease, req cost.Request) *tracker {
	t := &tracker{s: s, lease: lease, req: req}
	if s.cfg.EstimateFirstToken {
		hs := s.cost.Speed(lease.Host())
		work := float64(lease.Ahead()+int64(req.PromptTokens)) * hs.TokenRatio
		d := time.Duration(work / hs.PrefillTokensPerSecond * float64(time.Second))
		t.timer = time.AfterFunc(d, func() { lease.FirstToken() })
	}
	return t
}

// responseHeaders notes the status; a response without a body ends here.
func (t *tracker) responseHeaders(hs *corev3.HeaderMap, eos bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	overloaded, attempts := false, 1
	for _, hv := range hs.GetHeaders() {
		switch strings.ToLower(hv.GetKey()) {
		case ":status":
			t.status, _ = strconv.Atoi(headerValue(hv))
		case "content-type":
			t.streamed = strings.HasPrefix(strings.ToLower(headerValue(hv)), "text/event-stream")
		case "x-envoy-overloaded":
			overloaded = true
		case "x-envoy-attempt-count":
			attempts, _ = strconv.Atoi(headerValue(hv))
		}
	}
	if t.status != 0 && !t.reported && t.s.cfg.ResponseStatus != nil {
		t.reported = true
		switch {
		case attempts > 1:
			// Envoy retried the request elsewhere (override_host's
			// fallbacks): the chosen host failed it, whatever the answer.
			t.s.cfg.ResponseStatus(t.lease.Host(), 503)
		case overloaded:
			// Envoy's own circuit breaker, not the host.
		default:
			t.s.cfg.ResponseStatus(t.lease.Host(), t.status)
		}
	}
	if eos {
		t.finishLocked(picker.ResponseHeaders)
	}
}

// responseBody notes a chunk of the response body: the first bytes are the
// first token (a streamed response's first event; a whole response
// otherwise).
func (t *tracker) responseBody(b []byte, eos bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(b) > 0 {
		if t.ttft == 0 && t.ok() {
			t.ttft = time.Since(t.lease.Start())
			t.lease.FirstToken()
		}
		t.events += bytes.Count(b, []byte("data: {"))
		t.tail = append(t.tail, b...)
		if n := len(t.tail); n > tailBytes {
			t.tail = append(t.tail[:0], t.tail[n-tailBytes:]...)
		}
	}
	if eos {
		t.finishLocked(picker.ResponseEnd)
	}
}

func (t *tracker) ok() bool { return t.status == 0 || t.status/100 == 2 }

// finish releases the lease and, for a successful response, teaches the
// cost model.
func (t *tracker) finish(cause picker.Cause) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.finishLocked(cause)
}

func (t *tracker) finishLocked(cause picker.Cause) {
	if t.finished {
		return
	}
	t.finished = true
	if t.timer != nil {
		t.timer.Stop()
	}
	if !t.lease.Release(cause) {
		return
	}
	if !t.ok() || (cause != picker.ResponseEnd && cause != picker.ResponseHeaders) {
		return
	}
	o := cost.Outcome{Host: t.lease.Host(), Request: t.req, Ahead: t.lease.Ahead(),
		Duration: time.Since(t.lease.Start())}
	if t.streamed {
		// Only a stream's first event times the prefill and splits the
		// response into prefill and decode: a whole response would teach
		// that prefill takes all of it and decoding no time at all.
		o.TTFT = t.ttft
	}
	if u, ok := parseUsage(t.tail); ok {
		o.PromptTokens, o.OutputTokens = u.prompt, u.completion
		t.s.m.usageSeen.WithLabelValues("yes").Inc()
	} else {
		o.OutputTokens = t.events // one token per streamed event, as vLLM sends them
		t.s.m.usageSeen.WithLabelValues("no").Inc()
	}
	t.s.cost.Learn(o)
	t.s.log.Debug("response ended", "host", o.Host, "cause", cause, "ttft", o.TTFT, "duration", o.Duration,
		"prompt_tokens", o.PromptTokens, "output_tokens", o.OutputTokens, "ahead", o.Ahead, "tokens", t.req.PromptTokens)
}

// abort releases the lease when the stream ends before the response did.
func (t *tracker) abort() {
	t.finish(picker.StreamEnd)
}

type usage struct{ prompt, completion int }

// parseUsage finds the last usage object in the end of a response body (a
// JSON response, or an SSE stream's final usage chunk) and reads its prompt
// and completion tokens. It scans bytes rather than parsing JSON: it sees
// only the body's tail, possibly cut anywhere.
func parseUsage(tail []byte) (usage, bool) {
	i := bytes.LastIndex(tail, []byte(`"usage"`))
	if i < 0 {
		return usage{}, false
	}
	obj := tail[i+len(`"usage"`):]
	if end := bytes.IndexByte(obj, '}'); end >= 0 {
		obj = obj[:end]
	}
	p, okP := intField(obj, `"prompt_tokens"`)
	c, okC := intField(obj, `"completion_tokens"`)
	if !okP || !okC {
		return usage{}, false
	}
	return usage{p, c}, true
}

// intField reads the non-negative integer after key and a colon.
func intField(obj []byte, key string) (int, bool) {
	i := bytes.Index(obj, []byte(key))
	if i < 0 {
		return 0, false
	}
	rest := bytes.TrimLeft(obj[i+len(key):], " \t\r\n")
	if len(rest) == 0 || rest[0] != ':' {
		return 0, false
	}
	rest = bytes.TrimLeft(rest[1:], " \t\r\n")
	n, digits := 0, 0
	for _, c := range rest {
		if c < '0' || c > '9' || digits > 9 {
			break
		}
		n = n*10 + int(c-'0')
		digits++
	}
	if digits > 9 {
		return 0, false
	}
	return n, digits > 0
}
