package processor_test

import (
	"context"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/tokenlb/tokenlb/cost"
	"github.com/tokenlb/tokenlb/picker"
	"github.com/tokenlb/tokenlb/processor"
	"github.com/tokenlb/tokenlb/route"
)

// step sends one message and waits for tokenlb's reply.
func step(t *testing.T, f *fakeEnvoy, r *extprocv3.ProcessingRequest) {
	t.Helper()
	if err := f.send(r); err != nil {
		t.Fatal(err)
	}
	if _, err := f.stream.Recv(); err != nil {
		t.Fatal(err)
	}
}

func respHeaders(status string, eos bool) *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{
		ResponseHeaders: &extprocv3.HttpHeaders{Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
			{Key: ":status", RawValue: []byte(status)}}}, EndOfStream: eos}}}
}

func respBody(b string, eos bool) *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{
		ResponseBody: &extprocv3.HttpBody{Body: []byte(b), EndOfStream: eos}}}
}

// ledger sums the picker's view of every host.
// ledgerSum is the fleet's ledger, summed over hosts.
type ledgerSum struct{ InFlightTokens, PrefillingTokens, Load, InFlightRequests int64 }

func (e *testEnv) ledger() (h ledgerSum) {
	for _, x := range e.picker.Hosts() {
		h.InFlightTokens += x.InFlightTokens
		h.PrefillingTokens += x.PrefillingTokens
		h.Load += x.Load
		h.InFlightRequests += x.InFlightRequests
	}
	return h
}

// eventually polls cond: for effects of messages tokenlb does not answer
// (an observer stream's), which give the test no event to wait on.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

var twoPhase = cost.Options{TwoPhase: true, EstimateOutput: true, DecodeWeight: 0.5}

const usageChunk = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":100,\"completion_tokens\":3}}\n\ndata: [DONE]\n\n"

// TestTwoPhaseOnTheRoutingStream: with the response body shown to the
// routing stream, the prefill part goes at the first chunk, the rest at the
// end, and the usage teaches the output estimate.
func TestTwoPhaseOnTheRoutingStream(t *testing.T) {
	model := cost.New(twoPhase)
	env := startEnv(t, threeHosts, picker.Options{}, Config{Cost: model})
	f := env.open(t, buffered)
	f.respMode = filterv3.ProcessingMode_STREAMED
	routed(t, f, post(chat(100)))
	full := env.ledger()
	if full.PrefillingTokens == 0 || full.Load == 0 {
		t.Fatalf("after routing: %+v", full)
	}
	step(t, f, respHeaders("200", false))
	if got := env.ledger(); got != full {
		t.Fatalf("the headers of a streamed response changed the ledger: %+v, was %+v", got, full)
	}
	step(t, f, respBody("data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n", false))
	mid := env.ledger()
	if mid.PrefillingTokens != 0 || mid.InFlightTokens != full.InFlightTokens || mid.Load >= full.Load || mid.Load == 0 {
		t.Fatalf("after the first token: %+v, was %+v", mid, full)
	}
	step(t, f, respBody("data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n", false))
	if got := env.ledger(); got != mid {
		t.Fatalf("a later token changed the ledger: %+v, was %+v", got, mid)
	}
	step(t, f, respBody(usageChunk, true))
	if got := env.ledger(); got != (ledgerSum{}) {
		t.Fatalf("after the end: %+v", got)
	}
	f.close()
	if got := model.Output(cost.Request{Model: "m", Route: "chat_completions"}); got >= cost.DefaultOutputTokens {
		t.Fatalf("output estimate %d after a 3-token response, want below the prior %d", got, cost.DefaultOutputTokens)
	}
}

// TestErrorResponseTeachesNothing: a 500's body is not a first token, and
// its length is not an output length.
func TestErrorResponseTeachesNothing(t *testing.T) {
	model := cost.New(twoPhase)
	env := startEnv(t, threeHosts, picker.Options{}, Config{Cost: model})
	f := env.open(t, buffered)
	f.respMode = filterv3.ProcessingMode_STREAMED
	routed(t, f, post(chat(100)))
	step(t, f, respHeaders("500", false))
	step(t, f, respBody(`{"error":{"message":"boom"},"usage":{"prompt_tokens":1,"completion_tokens":1}}`, false))
	if got := env.ledger(); got.PrefillingTokens == 0 {
		t.Fatalf("an error body released the prefill part: %+v", got)
	}
	step(t, f, respBody("", true))
	f.close()
	if got := env.ledger(); got != (ledgerSum{}) {
		t.Fatalf("after the end: %+v", got)
	}
	if got := model.Output(cost.Request{Model: "m", Route: "chat_completions"}); got != cost.DefaultOutputTokens {
		t.Fatalf("output estimate %d, want the prior", got)
	}
}

// openObserver opens a stream as the observer filter does.
func (e *testEnv) openObserver(t *testing.T) *fakeEnvoy { t.Helper(); return e.openRole(t, "observer") }

// openRole opens a stream as the observability-mode filter of role does.
func (e *testEnv) openRole(t *testing.T, role string) *fakeEnvoy {
	t.Helper()
	ctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(context.Background(), processor.ObserverMetadata, role))
	stream, err := e.client.Process(ctx)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(cancel)
	return &fakeEnvoy{t: t, stream: stream, cancel: cancel}
}

func observerHeaders(lease string) *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{
		Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{{Key: processor.DefaultLeaseHeader, RawValue: []byte(lease)}}}}}}
}

// TestObserverFollowsResponse: the routing stream hands the response over to
// the observer stream that claimed the request by its lease header and ends
// itself right after its response headers reply (so that the response no
// longer depends on it), which releases nothing.
func TestObserverFollowsResponse(t *testing.T) {
	env := startEnv(t, threeHosts, picker.Options{}, Config{Cost: cost.New(twoPhase), Observer: true})
	f := env.open(t, buffered)
	out := routed(t, f, post(chat(100)))
	lease := out.headers[processor.DefaultLeaseHeader]
	if len(lease) < 16 {
		t.Fatalf("lease header %q", lease)
	}
	full := env.ledger()
	o := env.openObserver(t)
	o.send(observerHeaders(lease))
	eventually(t, "the observer's claim", func() bool { return env.counter(t, "tokenlb_observer_claims_total", "observer/claimed") == 1 })
	if err := f.respond200Streaming(); err != nil {
		t.Fatal(err)
	}
	if _, err := f.stream.Recv(); err != io.EOF {
		t.Fatalf("routing stream after the response headers: %v, want its end (io.EOF)", err)
	}
	env.waitEnded(t, 1)
	f.close()
	if got := env.ledger(); got != full {
		t.Fatalf("the routing stream's end changed the ledger: %+v, was %+v", got, full)
	}
	o.send(respHeaders("200", false))
	o.send(respBody("data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n", false))
	eventually(t, "the prefill part's release", func() bool { return env.ledger().PrefillingTokens == 0 })
	if got := env.ledger(); got.InFlightTokens != full.InFlightTokens || got.Load == 0 {
		t.Fatalf("after the first token: %+v", got)
	}
	o.send(respBody(usageChunk, true))
	eventually(t, "the release at the end", func() bool { return env.ledger() == ledgerSum{} })
	if got := env.picker.Stats().Releases[route.ReleasedAtEnd]; got != 1 {
		t.Fatalf("releases by response_end: %d", got)
	}
}

// respond200Streaming delivers streaming response headers (more to come)
// and reads tokenlb's reply.
func (f *fakeEnvoy) respond200Streaming() error {
	if err := f.send(respHeaders("200", false)); err != nil {
		return err
	}
	_, err := f.stream.Recv()
	return err
}

// TestObserverAbort: an observer stream that ends before the response did
// (the client went away) releases everything.
func TestObserverAbort(t *testing.T) {
	env := startEnv(t, threeHosts, picker.Options{}, Config{Cost: cost.New(twoPhase), Observer: true})
	f := env.open(t, buffered)
	out := routed(t, f, post(chat(100)))
	o := env.openObserver(t)
	o.send(observerHeaders(out.headers[processor.DefaultLeaseHeader]))
	eventually(t, "the observer's claim", func() bool { return env.counter(t, "tokenlb_observer_claims_total", "observer/claimed") == 1 })
	f.respond200Streaming()
	f.close()
	o.abort()
	eventually(t, "the release", func() bool { return env.ledger() == ledgerSum{} })
	if got := env.picker.Stats().Releases[route.ReleasedStreamEnd]; got != 1 {
		t.Fatalf("releases by stream_end: %d", got)
	}
}

// graceTimers holds the grace timers the routing streams arm, for a test
// to fire.
type graceTimers struct {
	mu    sync.Mutex
	armed []func()
}

func (g *graceTimers) arm(f func()) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.armed = append(g.armed, f)
}

func (g *graceTimers) count() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.armed)
}

// fire runs timer i, as its grace period ending.
func (g *graceTimers) fire(i int) {
	g.mu.Lock()
	f := g.armed[i]
	g.mu.Unlock()
	f()
}

// TestObserverUnknownOrLate: a lease header that names nothing (a client's
// guess) claims nothing; an observer that claims after the routing stream
// saw the response headers still takes over, and the grace period's end
// then does nothing; a request nobody claims within the grace period is
// released then. The test fires the grace timers itself, so that no claim
// races one.
func TestObserverUnknownOrLate(t *testing.T) {
	timers := &graceTimers{}
	env := startEnv(t, threeHosts, picker.Options{}, Config{Cost: cost.New(twoPhase), Observer: true, GraceTimer: timers.arm})
	f := env.open(t, buffered)
	req := post(chat(100))
	req.headers[processor.DefaultLeaseHeader] = "guessed"
	out := routed(t, f, req)
	if out.headers[processor.DefaultLeaseHeader] == "guessed" {
		t.Fatal("the client's lease header survived")
	}
	o := env.openObserver(t)
	o.send(observerHeaders("guessed"))
	eventually(t, "the unknown claim", func() bool { return env.counter(t, "tokenlb_observer_claims_total", "observer/unknown") == 1 })
	f.respond200Streaming()
	if _, err := f.stream.Recv(); err != io.EOF {
		t.Fatalf("routing stream after the response headers: %v, want its end (io.EOF)", err)
	}
	f.close()
	if got := env.ledger(); got.InFlightRequests != 1 || timers.count() != 1 {
		t.Fatalf("released at the response headers while an observer may still claim it (%+v), or %d grace timers armed, want 1",
			got, timers.count())
	}
	// The real id, after the response headers: the observer takes over.
	late := env.openObserver(t)
	late.send(observerHeaders(out.headers[processor.DefaultLeaseHeader]))
	eventually(t, "the late claim", func() bool { return env.counter(t, "tokenlb_observer_claims_total", "observer/claimed") == 1 })
	timers.fire(0) // claimed: nothing to do
	if got := env.ledger(); got.InFlightRequests != 1 || env.counter(t, "tokenlb_observer_claims_total", "observer/none") != 0 {
		t.Fatalf("the grace period's end took a claimed request from its observer: %+v", got)
	}
	late.send(respBody(usageChunk, true))
	eventually(t, "the release at the end", func() bool { return env.ledger() == ledgerSum{} })

	// Nobody claims this one: released when the grace period ends.
	f = env.open(t, buffered)
	routed(t, f, post(chat(100)))
	f.respond200Streaming()
	f.close()
	eventually(t, "the second grace timer armed", func() bool { return timers.count() == 2 })
	if got := env.ledger(); got.InFlightRequests != 1 {
		t.Fatalf("released before the grace period ended: %+v", got)
	}
	timers.fire(1)
	if got := env.ledger(); got != (ledgerSum{}) {
		t.Fatalf("not released when the grace period ended: %+v", got)
	}
	if got := env.counter(t, "tokenlb_observer_claims_total", "observer/none"); got != 1 {
		t.Fatalf("unclaimed requests counted: %v", got)
	}
	if got := env.picker.Stats().Releases[route.ReleasedAtHeaders]; got != 1 {
		t.Fatalf("releases by response_headers: %v", got)
	}
}

// TestEstimateFirstToken: without seeing the response, the prefill part
// goes when the host should have prefilled the prompt, and the rest when
// the stream ends (Envoy holds it open to the end of the response when
// response trailers are SEND).
func TestEstimateFirstToken(t *testing.T) {
	// 10 tokens a second: a 1-word prompt (about 9 tokens with the chat
	// template) takes about 1 s by the estimate; a 100-word one queued
	// behind it about 12 s.
	slow := cost.Options{TwoPhase: true, DecodeWeight: 0.5, PrefillTokensPerSecond: 10}
	env := startEnv(t, threeHosts[:1], picker.Options{}, Config{Cost: cost.New(slow), EstimateFirstToken: true})
	short := env.open(t, buffered)
	routed(t, short, post(chat(1)))
	long := env.open(t, buffered)
	routed(t, long, post(chat(100)))
	full := env.ledger()
	eventually(t, "the short request's estimated first token", func() bool {
		return env.ledger().PrefillingTokens < full.PrefillingTokens
	})
	if got := env.ledger(); got.PrefillingTokens < 100 {
		t.Fatalf("the long request's prefill released early: %+v", got)
	}
	short.respond200Streaming()
	if got := env.ledger(); got.InFlightRequests != 2 {
		t.Fatalf("released at the response headers: %+v", got)
	}
	short.close()
	long.close()
	env.waitEnded(t, 2)
	if got := env.ledger(); got != (ledgerSum{}) {
		t.Fatalf("after both streams ended: %+v", got)
	}
}

func respHeadersTyped(status, contentType string) *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{
		ResponseHeaders: &extprocv3.HttpHeaders{Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
			{Key: ":status", RawValue: []byte(status)}, {Key: "content-type", RawValue: []byte(contentType)}}}}}}
}

// TestSpeedsLearnedFromStreamsOnly: a whole (non-streamed) response's first
// bytes come with its last, so it teaches the output length and the token
// ratio but nothing of the host's speeds; a streamed one teaches them too.
func TestSpeedsLearnedFromStreamsOnly(t *testing.T) {
	opts := twoPhase
	opts.Calibrate = true
	model := cost.New(opts)
	env := startEnv(t, threeHosts[:1], picker.Options{}, Config{Cost: model})
	host := threeHosts[0]
	prior := model.Speed(host)

	f := env.open(t, buffered)
	f.respMode = filterv3.ProcessingMode_STREAMED
	routed(t, f, post(chat(100)))
	step(t, f, respHeadersTyped("200", "application/json"))
	step(t, f, respBody(`{"choices":[{"message":{"content":"a b c"}}],"usage":{"prompt_tokens":200,"completion_tokens":3}}`, true))
	f.close()
	got := model.Speed(host)
	if got.PrefillTokensPerSecond != prior.PrefillTokensPerSecond || got.DecodeTokensPerSecond != prior.DecodeTokensPerSecond {
		t.Fatalf("a whole response taught speeds: %+v, prior %+v", got, prior)
	}
	if got.TokenRatio <= prior.TokenRatio {
		t.Fatalf("token ratio %v after a response reporting more prompt tokens, prior %v", got.TokenRatio, prior.TokenRatio)
	}

	f = env.open(t, buffered)
	f.respMode = filterv3.ProcessingMode_STREAMED
	routed(t, f, post(chat(100)))
	step(t, f, respHeadersTyped("200", "text/event-stream; charset=utf-8"))
	step(t, f, respBody("data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n", false))
	step(t, f, respBody("data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n", false))
	step(t, f, respBody(usageChunk, true))
	f.close()
	if s := model.Speed(host); s.PrefillTokensPerSecond == got.PrefillTokensPerSecond {
		t.Fatalf("a streamed response taught no prefill speed: %+v", s)
	}
	// Its time to first token was predicted, and how wrong the prediction
	// was is in the host's histogram and in what the estimator believes.
	if n := env.counter(t, "tokenlb_ttft_prediction_error_ratio", host); n != 1 {
		t.Fatalf("%v prediction errors observed, want the streamed response's 1", n)
	}
	if s := model.Speed(host); s.Predictions != 1 {
		t.Fatalf("the estimator checked %d predictions, want 1", s.Predictions)
	}
}

// TestResponseStatusReported: each routed response's status reaches
// Config.ResponseStatus once, for the host tokenlb chose; a request Envoy
// retried elsewhere counts as a failure of that host; Envoy's own overload
// answers and tokenlb's rejections are not reported.
func TestResponseStatusReported(t *testing.T) {
	type report struct {
		host   string
		status int
	}
	for _, tc := range []struct {
		name    string
		headers map[string]string
		want    int // 0: no report
	}{
		{"ok", map[string]string{":status": "200"}, 200},
		{"server error", map[string]string{":status": "503"}, 503},
		{"retried elsewhere", map[string]string{":status": "200", "x-envoy-attempt-count": "2"}, 503},
		{"envoy overloaded", map[string]string{":status": "503", "x-envoy-overloaded": "true"}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reports := make(chan report, 10)
			env := startEnv(t, threeHosts, picker.Options{}, Config{ResponseStatus: func(h string, s int) { reports <- report{h, s} }})
			f := env.open(t, buffered)
			host := routed(t, f, post(chat(10))).headers[processor.DefaultDestinationHeader]
			var hs []*corev3.HeaderValue
			for k, v := range tc.headers {
				hs = append(hs, &corev3.HeaderValue{Key: k, RawValue: []byte(v)})
			}
			step(t, f, &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{
				ResponseHeaders: &extprocv3.HttpHeaders{Headers: &corev3.HeaderMap{Headers: hs}, EndOfStream: true}}})
			f.close()
			env.waitEnded(t, 1)
			close(reports)
			var got []report
			for r := range reports {
				got = append(got, r)
			}
			switch {
			case tc.want == 0 && len(got) != 0:
				t.Fatalf("reported %v", got)
			case tc.want != 0 && (len(got) != 1 || got[0] != report{host, tc.want}):
				t.Fatalf("reported %v, want [{%s %d}]", got, host, tc.want)
			}
		})
	}
	// A rejected request has no response to report.
	reports := 0
	env := startEnv(t, threeHosts, picker.Options{}, Config{ResponseStatus: func(string, int) { reports++ }})
	f := env.open(t, buffered)
	if out, err := f.do(post([]byte(`{"messages": [`))); err != nil || out.immediate == nil {
		t.Fatalf("invalid JSON not rejected: %v", err)
	}
	f.close()
	env.waitEnded(t, 1)
	if reports != 0 {
		t.Fatalf("a rejection reported %d statuses", reports)
	}
}

// TestDrain: Drain waits for the routing streams open, serves new ones
// meanwhile, does not wait for observer streams, and gives up when its
// context ends.
func TestDrain(t *testing.T) {
	env := startEnv(t, threeHosts, picker.Options{}, Config{Cost: cost.New(twoPhase), Observer: true})
	if err := env.server.Drain(context.Background()); err != nil {
		t.Fatalf("drain with nothing open: %v", err)
	}
	f := env.open(t, buffered)
	out := routed(t, f, post(chat(100)))
	o := env.openObserver(t)
	o.send(observerHeaders(out.headers[processor.DefaultLeaseHeader]))
	eventually(t, "the observer's claim", func() bool { return env.counter(t, "tokenlb_observer_claims_total", "observer/claimed") == 1 })

	drained := make(chan error, 1)
	go func() { drained <- env.server.Drain(context.Background()) }()
	// A new request is routed while the drain waits for the first.
	g := env.open(t, buffered)
	routed(t, g, post(chat(10)))
	if err := g.respond("200"); err != nil {
		t.Fatal(err)
	}
	g.close()
	env.waitEnded(t, 1)
	// The first stream is still open: the drain must not end. (Waiting a
	// while is the only way to see that something does not happen.)
	select {
	case err := <-drained:
		t.Fatalf("drained (%v) with a routing stream open", err)
	case <-time.After(100 * time.Millisecond):
	}
	if err := f.respond200Streaming(); err != nil {
		t.Fatal(err)
	}
	// The routing stream ends itself; the observer stream, still open,
	// does not hold the drain up.
	if err := <-drained; err != nil {
		t.Fatalf("drain: %v", err)
	}

	h := env.open(t, buffered)
	routed(t, h, post(chat(10)))
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := env.server.Drain(ctx); err == nil {
		t.Fatal("drain with a routing stream open past its deadline: no error")
	}

	// Refused: a new stream fails at once; the open one goes on.
	env.server.Refuse()
	r := env.open(t, buffered)
	// The server may end the stream before the headers go out (Send then
	// sees io.EOF): the status comes with Recv either way.
	r.sendHeaders(post(chat(10)))
	if _, err := r.stream.Recv(); status.Code(err) != codes.Unavailable {
		t.Fatalf("a new stream after Refuse: %v, want Unavailable", err)
	}
	if err := h.respond("200"); err != nil {
		t.Fatalf("the open stream after Refuse: %v", err)
	}
	h.close()
	if err := env.server.Drain(context.Background()); err != nil {
		t.Fatalf("drain: %v", err)
	}
}

// TestObserverClaimedStreamedStaysOpen: when Envoy also sends this stream
// the response body (STREAMED), the routing stream is not done at the
// response headers even though an observer claimed the request: Envoy
// waits for its answers to the body.
func TestObserverClaimedStreamedStaysOpen(t *testing.T) {
	env := startEnv(t, threeHosts, picker.Options{}, Config{Cost: cost.New(twoPhase), Observer: true})
	f := env.open(t, buffered)
	f.respMode = filterv3.ProcessingMode_STREAMED
	out := routed(t, f, post(chat(100)))
	o := env.openObserver(t)
	o.send(observerHeaders(out.headers[processor.DefaultLeaseHeader]))
	eventually(t, "the observer's claim", func() bool { return env.counter(t, "tokenlb_observer_claims_total", "observer/claimed") == 1 })
	if err := f.respond200Streaming(); err != nil {
		t.Fatal(err)
	}
	step(t, f, respBody("data: {}\n\n", false))
	step(t, f, respBody(usageChunk, true))
	f.close()
}

// TestServedElsewhere: when the data plane reports (Endpoint Picker
// Protocol) that another host served the request, the charge moves there,
// the chosen host is told it failed and the serving host its status, and
// the release happens there, once.
func TestServedElsewhere(t *testing.T) {
	type report struct {
		host   string
		status int
	}
	reports := make(chan report, 10)
	env := startEnv(t, threeHosts, picker.Options{}, Config{Cost: cost.New(twoPhase), Fallbacks: 2,
		ResponseStatus: func(h string, s int) { reports <- report{h, s} }})
	f := env.open(t, buffered)
	f.respMode = filterv3.ProcessingMode_STREAMED
	out := routed(t, f, post(chat(100)))
	list := strings.Split(out.metadata[processor.DefaultDestinationHeader], ",")
	chosen, fallback := list[0], list[1]
	served, err := structpb.NewStruct(map[string]any{processor.ServedKey: fallback})
	if err != nil {
		t.Fatal(err)
	}
	headers := respHeaders("200", false)
	headers.MetadataContext = &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{processor.DefaultMetadataNamespace: served}}
	step(t, f, headers)
	loads := map[string]int64{}
	for _, h := range env.picker.Hosts() {
		loads[h.Address] = h.InFlightRequests
	}
	if loads[chosen] != 0 || loads[fallback] != 1 {
		t.Fatalf("in flight after the response headers: %v (chosen %s, served by %s)", loads, chosen, fallback)
	}
	step(t, f, respBody(usageChunk, true))
	f.close()
	env.waitEnded(t, 1)
	if got := env.ledger(); got != (ledgerSum{}) {
		t.Fatalf("after the end: %+v", got)
	}
	close(reports)
	var got []report
	for r := range reports {
		got = append(got, r)
	}
	if !slices.Equal(got, []report{{chosen, 503}, {fallback, 200}}) {
		t.Fatalf("reported %v, want the chosen host's failure then the serving host's 200", got)
	}
}
