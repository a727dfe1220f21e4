package processor_test

import (
	"io"
	"testing"
	"time"

	"github.com/tokenlb/tokenlb/cost"
	"github.com/tokenlb/tokenlb/picker"
	"github.com/tokenlb/tokenlb/processor"
	"github.com/tokenlb/tokenlb/route"
)

// neverFollow makes the Router follow no streamed response past its first
// token; followAll, every one.
const (
	neverFollow = -time.Second
	followAll   = 0
)

// openEnd opens a stream as the end filter does.
func (e *testEnv) openEnd(t *testing.T) *fakeEnvoy { t.Helper(); return e.openRole(t, "end") }

const (
	sseHeaders = "text/event-stream"
	firstEvent = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"
)

// threeStreams routes a request and has an observer and an end stream
// claim it, as deploy/envoy.yaml's three filters do; the routing stream has
// handed the response over and ended.
func threeStreams(t *testing.T, env *testEnv) (o, end *fakeEnvoy, full ledgerSum) {
	t.Helper()
	f := env.open(t, buffered)
	out := routed(t, f, post(chat(100)))
	lease := out.headers[processor.DefaultLeaseHeader]
	full = env.ledger()
	o = env.openObserver(t)
	o.send(observerHeaders(lease))
	end = env.openEnd(t)
	end.send(observerHeaders(lease))
	eventually(t, "both claims", func() bool {
		return env.counter(t, "tokenlb_observer_claims_total", "observer/claimed") == 1 &&
			env.counter(t, "tokenlb_observer_claims_total", "end/claimed") == 1
	})
	if err := f.respond200Streaming(); err != nil {
		t.Fatal(err)
	}
	if _, err := f.stream.Recv(); err != io.EOF {
		t.Fatalf("routing stream after the response headers: %v, want its end", err)
	}
	f.close()
	return o, end, full
}

// TestObserverStopsAtFirstToken: a streamed response the Router does not
// follow costs the observer stream its headers and first chunk: tokenlb
// ends the stream there (Envoy then sends no more chunks), the first token
// releases the prefill part and teaches the time to first token, and the
// end stream's close releases the rest, once, teaching nothing more.
func TestObserverStopsAtFirstToken(t *testing.T) {
	opts := twoPhase
	opts.Calibrate = true
	model := cost.New(opts)
	env := startEnv(t, threeHosts[:1], picker.Options{}, Config{Cost: model, Observer: true, FollowInterval: neverFollow})
	host := threeHosts[0]
	o, end, full := threeStreams(t, env)

	o.send(respHeadersTyped("200", sseHeaders))
	o.send(respBody(firstEvent, false))
	if _, err := o.stream.Recv(); err != io.EOF {
		t.Fatalf("observer stream after the first token: %v, want its end (io.EOF)", err)
	}
	if got := env.ledger(); got.PrefillingTokens != 0 || got.InFlightTokens != full.InFlightTokens || got.InFlightRequests != 1 {
		t.Fatalf("after the first token: %+v, want the prefill part released and the rest held (was %+v)", got, full)
	}
	if s := model.Speed(host); s.Predictions != 1 {
		t.Fatalf("the estimator checked %d time-to-first-token predictions, want 1 (taught at the first token)", s.Predictions)
	}
	if n := env.counter(t, "tokenlb_observer_handovers_total", ""); n != 1 {
		t.Fatalf("handovers %v, want 1", n)
	}
	if n := env.counter(t, "tokenlb_streamed_responses_followed_total", "first_token"); n != 1 {
		t.Fatalf("responses followed to the first token only: %v, want 1", n)
	}

	end.close()
	eventually(t, "the release at the end stream's close", func() bool { return env.ledger() == ledgerSum{} })
	st := env.picker.Stats()
	if st.Releases[route.ReleasedClosed] != 1 || len(nonZero(st.Releases)) != 1 {
		t.Fatalf("releases %v, want one request_closed", st.Releases)
	}
	if s := model.Speed(host); s.Predictions != 1 {
		t.Fatalf("the end taught again: %d predictions checked", s.Predictions)
	}
	if n := env.counter(t, "tokenlb_responses_usage_total", "no") + env.counter(t, "tokenlb_responses_usage_total", "yes"); n != 0 {
		t.Fatalf("an unfollowed response counted as followed to its end: %v", n)
	}
	if got := model.Output(cost.Request{Model: "m", Route: "chat_completions"}); got != cost.DefaultOutputTokens {
		t.Fatalf("output estimate %d, want the prior: an unfollowed response knows no output length", got)
	}
}

// nonZero keeps the causes that released something.
func nonZero(m map[picker.Cause]uint64) map[picker.Cause]uint64 {
	out := map[picker.Cause]uint64{}
	for k, v := range m {
		if v != 0 {
			out[k] = v
		}
	}
	return out
}

// TestFollowedResponseEndsWithItsBody: a response the Router follows is
// shown to its end even with an end stream: the end stream's close (which
// may come first: another stream, another goroutine) releases nothing, and
// the body's end releases the rest and teaches its usage.
func TestFollowedResponseEndsWithItsBody(t *testing.T) {
	model := cost.New(twoPhase)
	env := startEnv(t, threeHosts, picker.Options{}, Config{Cost: model, Observer: true, FollowInterval: followAll})
	o, end, full := threeStreams(t, env)
	o.send(respHeadersTyped("200", sseHeaders))
	o.send(respBody(firstEvent, false))
	eventually(t, "the first token", func() bool { return env.ledger().PrefillingTokens == 0 })
	end.close()
	env.waitEnded(t, 2) // the routing stream and the end stream
	if got := env.ledger(); got.InFlightTokens != full.InFlightTokens || got.InFlightRequests != 1 {
		t.Fatalf("the end stream's close released a response the observer follows: %+v", got)
	}
	o.send(respBody(firstEvent, false))
	o.send(respBody(usageChunk, true))
	eventually(t, "the release at the body's end", func() bool { return env.ledger() == ledgerSum{} })
	if st := env.picker.Stats(); st.Releases[route.ReleasedAtEnd] != 1 || len(nonZero(st.Releases)) != 1 {
		t.Fatalf("releases %v, want one response_end", st.Releases)
	}
	// The lease is released before the estimator learns: wait for both.
	eventually(t, "the followed response's usage to teach an output length", func() bool {
		return model.Output(cost.Request{Model: "m", Route: "chat_completions"}) != cost.DefaultOutputTokens
	})
	if n := env.counter(t, "tokenlb_streamed_responses_followed_total", "end"); n != 1 {
		t.Fatalf("responses followed to the end: %v, want 1", n)
	}
}

// TestObserverFollowsWithoutEndStream: with no end filter (an Envoy config
// from before it), nothing else would report the end, so the observer
// follows every response to its end even when the Router asks for no more,
// and the response, seen whole, teaches its usage as any other.
func TestObserverFollowsWithoutEndStream(t *testing.T) {
	model := cost.New(twoPhase)
	env := startEnv(t, threeHosts, picker.Options{}, Config{Cost: model, Observer: true, FollowInterval: neverFollow})
	f := env.open(t, buffered)
	out := routed(t, f, post(chat(100)))
	o := env.openObserver(t)
	o.send(observerHeaders(out.headers[processor.DefaultLeaseHeader]))
	eventually(t, "the claim", func() bool { return env.counter(t, "tokenlb_observer_claims_total", "observer/claimed") == 1 })
	f.respond200Streaming()
	f.close()
	o.send(respHeadersTyped("200", sseHeaders))
	o.send(respBody(firstEvent, false))
	o.send(respBody(firstEvent, false))
	eventually(t, "the first token", func() bool { return env.ledger().PrefillingTokens == 0 })
	if got := env.ledger(); got.InFlightRequests != 1 {
		t.Fatalf("released before the end: %+v", got)
	}
	o.send(respBody(usageChunk, true))
	eventually(t, "the release at the body's end", func() bool { return env.ledger() == ledgerSum{} })
	if st := env.picker.Stats(); st.Releases[route.ReleasedAtEnd] != 1 || len(nonZero(st.Releases)) != 1 {
		t.Fatalf("releases %v, want one response_end", st.Releases)
	}
	if n := env.counter(t, "tokenlb_observer_handovers_total", ""); n != 0 {
		t.Fatalf("handed over %v responses with no end stream", n)
	}
	eventually(t, "the usage of a response seen whole to teach an output length", func() bool {
		return model.Output(cost.Request{Model: "m", Route: "chat_completions"}) != cost.DefaultOutputTokens
	})
}

// TestEndStreamBeforeFirstToken: a request abandoned before its first token
// (the end stream closes first) stays with the observer, which still
// follows it; the observer stream's end releases it, once.
func TestEndStreamBeforeFirstToken(t *testing.T) {
	env := startEnv(t, threeHosts, picker.Options{}, Config{Cost: cost.New(twoPhase), Observer: true, FollowInterval: neverFollow})
	o, end, full := threeStreams(t, env)
	o.send(respHeadersTyped("200", sseHeaders))
	end.close()
	env.waitEnded(t, 2)
	if got := env.ledger(); got != full {
		t.Fatalf("the end stream released a response the observer still follows: %+v, was %+v", got, full)
	}
	o.abort()
	eventually(t, "the release", func() bool { return env.ledger() == ledgerSum{} })
	if st := env.picker.Stats(); st.Releases[route.ReleasedStreamEnd] != 1 || len(nonZero(st.Releases)) != 1 {
		t.Fatalf("releases %v, want one stream_end", st.Releases)
	}
}

// TestEndStreamClaims: an end stream with a lease nobody issued claims
// nothing, a second one for the same request neither, and neither ends
// anything when it closes; an end stream that closes while no observer
// claimed the request (the routing stream waits for one) releases it.
func TestEndStreamClaims(t *testing.T) {
	env := startEnv(t, threeHosts, picker.Options{}, Config{Cost: cost.New(twoPhase), Observer: true})
	f := env.open(t, buffered)
	out := routed(t, f, post(chat(100)))
	lease := out.headers[processor.DefaultLeaseHeader]
	guess := env.openEnd(t)
	guess.send(observerHeaders("guessed"))
	first := env.openEnd(t)
	first.send(observerHeaders(lease))
	eventually(t, "the unknown and the first claim", func() bool {
		return env.counter(t, "tokenlb_observer_claims_total", "end/unknown") == 1 &&
			env.counter(t, "tokenlb_observer_claims_total", "end/claimed") == 1
	})
	second := env.openEnd(t)
	second.send(observerHeaders(lease))
	eventually(t, "the second claim", func() bool { return env.counter(t, "tokenlb_observer_claims_total", "end/late") == 1 })
	full := env.ledger()
	guess.close()
	second.close()
	env.waitEnded(t, 2)
	if got := env.ledger(); got != full {
		t.Fatalf("an end stream that claimed nothing released something: %+v, was %+v", got, full)
	}
	f.respond200Streaming()
	f.close()
	first.close()
	eventually(t, "the release", func() bool { return env.ledger() == ledgerSum{} })
	if st := env.picker.Stats(); st.Releases[route.ReleasedClosed] != 1 || len(nonZero(st.Releases)) != 1 {
		t.Fatalf("releases %v, want one request_closed", st.Releases)
	}
}
