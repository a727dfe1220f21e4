package e2e

import (
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/tokenlb/tokenlb/internal/envoycfg"
)

// TestStreamedResponseObservedCheaply: with deploy/envoy.yaml's three
// filters, a streamed response tokenlb does not follow to its end costs the
// observer stream three messages however long the response (request
// headers, response headers, first chunk: tokenlb then ends the stream and,
// once that reaches Envoy, Envoy sends no more), and the end filter's stream
// one; the first token releases the prefill part and the end filter's close
// the rest. A response tokenlb follows (follow_interval 0), or any response
// without the end filter (a configuration from before it), costs a message
// a chunk and ends with its body.
func TestStreamedResponseObservedCheaply(t *testing.T) {
	const events = 40
	for _, tc := range []struct {
		name       string
		followOne  string
		withoutEnd bool
		cause      string
		cheap      bool
	}{
		{"first token only", "-1s", false, "request_closed", true},
		{"followed to the end", "0", false, "response_end", false},
		{"without the end filter", "-1s", true, "response_end", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startStack(t, envoyOpts{config: "envoy.yaml", tokenlb: []string{"--follow-interval=" + tc.followOne},
				Options: envoycfg.Options{WithoutEnd: tc.withoutEnd}})
			// The observer hands a response over at its first token
			// only once the end stream has claimed it (else it follows
			// on, and tries again at the next chunk), and Envoy sends the
			// observer every chunk that comes before tokenlb's end of that
			// stream reaches it. The backend therefore holds its first
			// event until tokenlb has the end stream's claim, and the rest
			// until Envoy has counted the observer stream closed, or,
			// where tokenlb follows the response, checks that it is open.
			endClaimed := func() bool {
				return tc.withoutEnd || s.tokenlb.metric(`tokenlb_observer_claims_total{result="claimed",role="end"}`) == 1
			}
			closed := "http.llm.ext_proc.tokenlb_observer.streams_closed"
			settled := func() bool {
				n := s.envoy.stat(t, closed)
				if !tc.cheap && n != 0 {
					t.Fatalf("%s: %d before the response ended, want 0", closed, n)
				}
				return n == 1 || !tc.cheap
			}
			rest := s.heldStreamAwaiting(t, map[string]string{"x-e2e-events": "40"}, endClaimed, settled)
			if got := strings.Count(rest, "data: "); got != events+2 {
				t.Fatalf("%d more events reached the client, want %d", got, events+2)
			}
			s.tokenlb.waitIdle()
			if n := s.tokenlb.metric(`tokenlb_releases_total{cause="` + tc.cause + `"}`); n != 1 {
				t.Fatalf("releases by %s: %v, want 1", tc.cause, n)
			}
			observer := s.envoy.stat(t, "http.llm.ext_proc.tokenlb_observer.stream_msgs_sent")
			if tc.cheap && observer != 3 {
				t.Fatalf("the observer stream was sent %d messages, want 3 (request headers, response headers, first chunk)", observer)
			}
			// About one an event; Envoy reads events that come while it is
			// not scheduled as one chunk, so the bound leaves room for a
			// loaded machine and still stands well clear of the 3 above.
			if !tc.cheap && observer < 10 {
				t.Fatalf("the observer stream was sent %d messages for %d paced events, want about one an event (at least 10)", observer, events)
			}
			if end := s.envoy.stat(t, "http.llm.ext_proc.tokenlb_end.stream_msgs_sent"); !tc.withoutEnd && end != 1 {
				t.Fatalf("the end stream was sent %d messages, want 1 (request headers)", end)
			}
		})
	}
}

// TestRequestIDReturned: the client gets Envoy's x-request-id back, and
// tokenlb's line for the request, written when it ends, carries the same
// id, so that a client's report can be found in the logs.
func TestRequestIDReturned(t *testing.T) {
	s := startStack(t, envoyOpts{config: "envoy.yaml"})
	resp, err := s.send(context.Background(), chatBody(20, true), "", nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	id := resp.Header.Get("x-request-id")
	if resp.StatusCode != 200 || id == "" {
		t.Fatalf("status %d, x-request-id %q", resp.StatusCode, id)
	}
	s.tokenlb.waitIdle()
	waitFor(t, 5*time.Second, "tokenlb's line for the request", func() bool {
		for _, line := range strings.Split(s.tokenlb.proc.log.String(), "\n") {
			if strings.Contains(line, "msg=request ") && strings.Contains(line, "request_id="+id) {
				return true
			}
		}
		return false
	})
}
