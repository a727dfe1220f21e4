package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenlb/tokenlb/internal/envoycfg"
)

var configs = []string{"envoy.yaml", "envoy-override-host.yaml"}

func TestDeployConfigsValidate(t *testing.T) {
	for _, c := range configs {
		t.Run(c, func(t *testing.T) {
			out, err := execOutput(envoyBin, "--mode", "validate", "-c", repoRoot+"/deploy/"+c)
			if err != nil || !strings.Contains(out, "OK") {
				t.Fatalf("envoy --mode validate %s: %v\n%s", c, err, lastLines(out, 20))
			}
		})
	}
}

func TestRoutingFollowsTokenLoad(t *testing.T) {
	for _, c := range configs {
		t.Run(c, func(t *testing.T) {
			s := startStack(t, envoyOpts{config: c})
			// One long request held on A, then two short ones held on each of
			// B and C: A carries the most tokens but the fewest requests.
			a, releaseLong := s.holdOn(t, "long", chatBody(3000, false))
			var releases []func()
			perHost := map[*backend]int{}
			for i := range 4 {
				b, release := s.holdOn(t, fmt.Sprintf("short-%d", i), chatBody(10, false))
				if b == a {
					t.Fatalf("short request %d joined the long one on %s", i, a.addr)
				}
				perHost[b]++
				releases = append(releases, release)
			}
			if len(perHost) != 2 || perHost[s.backends[0]] > 2 || perHost[s.backends[1]] > 2 || perHost[s.backends[2]] > 2 {
				t.Fatalf("short requests not spread over the two other hosts: %v", perHost)
			}
			// A request counter would now pick A (1 request against 2 and 2);
			// token load picks B or C.
			for i := range 4 {
				rec := s.complete(t, chatBody(10, false), nil)
				if rec.Backend == a.addr {
					t.Fatalf("request %d went to %s, which holds 3,000 tokens", i, rec.Backend)
				}
				if rec.Header != rec.Backend {
					t.Fatalf("backend %s got destination header %q", rec.Backend, rec.Header)
				}
			}
			releaseLong()
			for _, r := range releases {
				r()
			}
			s.tokenlb.waitIdle()
			// With equal load, traffic spreads over all three.
			seen := map[string]int{}
			for range 30 {
				seen[s.complete(t, chatBody(10, false), nil).Backend]++
			}
			if len(seen) != 3 {
				t.Fatalf("30 requests at equal load reached %d backends: %v", len(seen), seen)
			}
			s.tokenlb.waitIdle()
		})
	}
}

func TestBodyIntegrity(t *testing.T) {
	big := strings.Repeat("naïve café 日本語のテキスト 😀 ", 2<<20/40) // about 2 MiB
	for _, tc := range []struct {
		name   string
		config string
		duplex bool
	}{{"buffered", "envoy.yaml", false}, {"full_duplex", "envoy.yaml", true}, {"override_host", "envoy-override-host.yaml", false}} {
		t.Run(tc.name, func(t *testing.T) {
			s := startStack(t, envoyOpts{config: tc.config, Options: envoycfg.Options{Duplex: tc.duplex}})
			for _, words := range []int{1, 200} {
				body := chatBody(words, false)
				checkBody(t, s, body)
			}
			body, _ := json.Marshal(map[string]any{"messages": []map[string]string{{"role": "user", "content": big}}})
			if len(body) < 2<<20 {
				t.Fatalf("test body only %d bytes", len(body))
			}
			checkBody(t, s, body)
			s.tokenlb.waitIdle()
			// Three requests: BUFFERED sends the routing filter request
			// headers, the body in one message and the response headers for
			// each (9); full duplex streams the 2 MiB body as several. The
			// observer gets request headers, response headers, the
			// (one-chunk) body and its end for each.
			sent := s.envoy.stat(t, "http.llm.ext_proc.tokenlb.stream_msgs_sent")
			if tc.duplex && sent <= 9 || !tc.duplex && sent != 9 {
				t.Fatalf("envoy sent tokenlb %d messages for 3 requests (duplex %v)", sent, tc.duplex)
			}
			if got := s.tokenlb.metric(`tokenlb_observer_claims_total{result="claimed",role="observer"}`); got != 3 {
				t.Fatalf("observer claimed %v requests, want 3", got)
			}
		})
	}
}

func checkBody(t *testing.T, s *stack, body []byte) {
	t.Helper()
	rec := s.complete(t, body, nil)
	sum := sha256.Sum256(body)
	if rec.BodyLen != len(body) || rec.BodySHA256 != hex.EncodeToString(sum[:]) {
		t.Fatalf("backend got %d bytes (sha %s), sent %d (sha %x)", rec.BodyLen, rec.BodySHA256[:12], len(body), sum[:6])
	}
}

// TestSSEStreamsThrough: the first event reaches the client before the
// backend finishes, and tokenlb follows the response: the prefill part of
// the charge goes at the first event, the rest at the end. Both deploy
// configs see responses through the observer filter; envoy.yaml is also
// run the other ways tokenlb can see them.
func TestSSEStreamsThrough(t *testing.T) {
	for _, tc := range []struct {
		name, config, response string
		tokenlb                []string
	}{
		{"envoy.yaml", "envoy.yaml", "", nil},
		{"envoy-override-host.yaml", "envoy-override-host.yaml", "", nil},
		{"envoy.yaml streamed", "envoy.yaml", "streamed", []string{"--observer=false"}},
		{"envoy.yaml estimate", "envoy.yaml", "estimate", []string{"--observer=false", "--estimate-first-token"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startStack(t, envoyOpts{config: tc.config, tokenlb: tc.tokenlb,
				Options: envoycfg.Options{Response: tc.response}})
			rest := s.heldStream(t, nil)
			if !strings.Contains(rest, "data: [DONE]") {
				t.Fatalf("stream ended without [DONE]: %q", rest)
			}
			s.tokenlb.waitIdle()
		})
	}
}

// heldStream sends a streamed chat request that the backend holds after
// its first event, and checks that the first event comes through before the
// backend goes on, and that past it only the decode part stays charged (the
// prompt is prefilled) until the end; then it lets the backend finish and
// returns the rest of the stream.
func (s *stack) heldStream(t *testing.T, header map[string]string) string {
	return s.heldStreamAwaiting(t, header, nil, nil)
}

// heldStreamAwaiting is heldStream, where the backend also holds its first
// event until beforeFirst returns true, and the rest until afterFirst
// does (either may be nil).
func (s *stack) heldStreamAwaiting(t *testing.T, header map[string]string, beforeFirst, afterFirst func() bool) string {
	t.Helper()
	if beforeFirst != nil {
		h := map[string]string{"x-e2e-hold-first": "1"}
		maps.Copy(h, header)
		header = h
	}
	resp, err := s.send(context.Background(), chatBody(50, true), "sse", header)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b := s.arrival(t, "sse")
	if beforeFirst != nil {
		waitFor(t, 5*time.Second, "the first event's condition", beforeFirst)
		b.release("sse/first")
	}
	r := bufio.NewReader(resp.Body)
	first, err := r.ReadString('\n')
	if err != nil || !strings.HasPrefix(first, "data: {") || !strings.Contains(first, b.addr) {
		t.Fatalf("first event %q, %v", first, err)
	}
	waitFor(t, 5*time.Second, "the prefill part released", func() bool {
		var prefilling int64
		for _, h := range s.tokenlb.hostLoads() {
			prefilling += h.PrefillingTokens
		}
		return prefilling == 0
	})
	if s.tokenlb.idle() {
		t.Fatal("charge released while the stream is still running")
	}
	if afterFirst != nil {
		waitFor(t, 5*time.Second, "the rest's condition", afterFirst)
	}
	b.release("sse")
	rest, _ := io.ReadAll(r)
	return string(rest)
}

func TestClientDisconnects(t *testing.T) {
	for _, c := range configs {
		for _, stream := range []bool{false, true} {
			name := c + "/before response headers"
			if stream {
				name = c + "/mid-stream"
			}
			t.Run(name, func(t *testing.T) {
				s := startStack(t, envoyOpts{config: c})
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				type result struct {
					resp *http.Response
					err  error
				}
				done := make(chan result, 1)
				go func() {
					resp, err := s.send(ctx, chatBody(2000, stream), "gone", nil)
					done <- result{resp, err}
				}()
				b := s.arrival(t, "gone")
				if stream {
					r := <-done
					if r.err != nil {
						t.Fatal(r.err)
					}
					if _, err := bufio.NewReader(r.resp.Body).ReadString('\n'); err != nil {
						t.Fatal(err)
					}
					cancel()
					r.resp.Body.Close()
				} else {
					if s.tokenlb.idle() {
						t.Fatal("nothing in flight while the backend holds the request")
					}
					cancel()
					<-done
				}
				// Envoy passed the abort on to the backend...
				select {
				case <-b.cancelled:
				case <-time.After(10 * time.Second):
					t.Fatal("the backend never saw the client go away")
				}
				// ...and tokenlb returned the charge.
				s.tokenlb.waitIdle()
				if !stream && s.tokenlb.metric(`tokenlb_releases_total{cause="stream_end"}`) != 1 {
					t.Fatalf("release before response headers was not by stream end")
				}
			})
		}
	}
}

func TestBackendRefusesConnections(t *testing.T) {
	dead := fmt.Sprintf("127.0.0.1:%d", freePort(t)) // nothing listens there
	tl := startTokenlb(t, []string{dead})
	e := startEnvoy(t, envoyOpts{config: "envoy.yaml", Options: envoycfg.Options{TokenlbPort: tl.grpcPort}})
	resp, err := http.Post(e.url("/v1/chat/completions"), "application/json", bytes.NewReader(chatBody(100, false)))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 503 {
		t.Fatalf("status %d, want 503", resp.StatusCode)
	}
	if code, msg := openAIError(t, resp); code != "proxy_error" || !strings.Contains(msg, "Connection_refused") {
		t.Fatalf("error %q, %q does not say the backend refused the connection", code, msg)
	}
	tl.waitIdle()
}

func TestTokenlbKilled(t *testing.T) {
	for _, tc := range []struct {
		config     string
		wantStatus int
	}{{"envoy.yaml", 503}, {"envoy-override-host.yaml", 200}} {
		t.Run(tc.config, func(t *testing.T) {
			// The two long prompts below are the same text, which prefix
			// affinity would rightly send to one host; this test is about
			// token load, so affinity is off.
			s := startStack(t, envoyOpts{config: tc.config, tokenlb: []string{"--prefix-max-extra-load=0"}})
			s.complete(t, chatBody(10, false), nil)
			s.tokenlb.proc.kill()
			for i := range 5 {
				resp, err := http.Post(s.envoy.url("/v1/chat/completions"), "application/json", bytes.NewReader(chatBody(10, false)))
				if err != nil {
					t.Fatal(err)
				}
				if resp.StatusCode != tc.wantStatus {
					b, _ := io.ReadAll(resp.Body)
					t.Fatalf("request %d with tokenlb down: status %d, want %d: %s", i, resp.StatusCode, tc.wantStatus, b)
				}
				if tc.wantStatus == 503 {
					// A plain answer a client can act on; Envoy's detail
					// (the ext_proc failure) is in its access log.
					if code, msg := openAIError(t, resp); code != "router_unavailable" || strings.Contains(msg, "ext_proc") {
						t.Fatalf("503 with tokenlb down: code %q, message %q", code, msg)
					}
					if ra := resp.Header.Get("retry-after"); ra != "1" {
						t.Fatalf("503 with tokenlb down: retry-after %q, want 1", ra)
					}
				}
				resp.Body.Close()
			}
			if tc.wantStatus == 503 {
				// Envoy writes its access log in batches (every 10 s at most).
				waitFor(t, 15*time.Second, "the access log's line for a refused request", func() bool {
					return strings.Contains(s.envoy.proc.log.String(), `"details":"ext_proc_error_gRPC_error_14`)
				})
			}
			// tokenlb comes back: routing is token-aware again.
			s.tokenlb.start()
			waitFor(t, 20*time.Second, "envoy routing through tokenlb again", func() bool {
				resp, err := s.send(context.Background(), chatBody(10, false), "", nil)
				if err != nil {
					return false
				}
				defer resp.Body.Close()
				var rec received
				return resp.StatusCode == 200 && json.NewDecoder(resp.Body).Decode(&rec) == nil && rec.Header != ""
			})
			b1, release1 := s.holdOn(t, "after-restart-1", chatBody(3000, false))
			b2, release2 := s.holdOn(t, "after-restart-2", chatBody(3000, false))
			if b1 == b2 {
				t.Fatalf("after restart both long requests went to %s", b1.addr)
			}
			if rec := s.complete(t, chatBody(10, false), nil); rec.Backend == b1.addr || rec.Backend == b2.addr {
				t.Fatalf("after restart a short request went to busy %s", rec.Backend)
			}
			release1()
			release2()
			s.tokenlb.waitIdle()
		})
	}
}

func TestSpoofedDestinationNeverReachesCanary(t *testing.T) {
	canary, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer canary.Close()
	var reached atomic.Int64
	go func() {
		for {
			c, err := canary.Accept()
			if err != nil {
				return
			}
			reached.Add(1)
			c.Close()
		}
	}()
	spoof := map[string]string{"x-gateway-destination-endpoint": canary.Addr().String()}
	for _, c := range append(configs, "envoy.yaml without the sanitising filter") {
		t.Run(c, func(t *testing.T) {
			config, _, unsanitised := strings.Cut(c, " ")
			s := startStack(t, envoyOpts{config: config, Options: envoycfg.Options{Unsanitised: unsanitised}})
			for range 10 {
				if rec := s.complete(t, chatBody(10, false), spoof); s.byAddr[rec.Backend] == nil {
					t.Fatalf("served by %s", rec.Backend)
				}
			}
			if config == "envoy-override-host.yaml" {
				// Even with tokenlb down (fail open, no sanitised choice).
				s.tokenlb.proc.kill()
				for range 10 {
					s.complete(t, chatBody(10, false), spoof)
				}
			}
		})
	}
	if n := reached.Load(); n != 0 {
		t.Fatalf("the canary was reached %d times", n)
	}
}

func TestErrorReplies(t *testing.T) {
	for _, c := range configs {
		t.Run(c, func(t *testing.T) { testErrorReplies(t, c) })
	}
}

func testErrorReplies(t *testing.T, config string) {
	s := startStack(t, envoyOpts{config: config})
	huge := bytes.Repeat([]byte("a"), 9<<20)
	cases := []struct {
		name   string
		body   io.Reader
		status int
		code   string
	}{
		{"invalid JSON", strings.NewReader(`{"messages": [`), 400, "invalid_json"},
		{"nothing to count", strings.NewReader(`{"messages": []}`), 400, "missing_prompt"},
		// content-length above the limit: tokenlb answers at the headers.
		{"over the limit with content-length", bytes.NewReader(huge), 413, "request_too_large"},
		// chunked, no content-length: Envoy's buffer limit answers.
		{"over the limit chunked", io.MultiReader(bytes.NewReader(huge)), 413, "request_too_large"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			resp, err := http.Post(s.envoy.url("/v1/chat/completions"), "application/json", c.body)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != c.status {
				b, _ := io.ReadAll(resp.Body)
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, c.status, b)
			}
			if code, _ := openAIError(t, resp); code != c.code {
				t.Fatalf("code %q, want %q", code, c.code)
			}
		})
	}
	for _, b := range s.backends {
		if n := b.requests.Load(); n != 0 {
			t.Fatalf("backend %s received %d rejected requests", b.addr, n)
		}
	}
	s.tokenlb.waitIdle()
}

// TestDeadBackendOverrideHost: tokenlb keeps naming a backend that is down
// (it fails fast and so looks idle); the override-host config retries such a
// request on another endpoint, so clients see no error.
func TestDeadBackendOverrideHost(t *testing.T) {
	s := startStack(t, envoyOpts{config: "envoy-override-host.yaml", tokenlb: longEjection()})
	dead := s.backends[0]
	dead.srv.Close()
	for i := range 30 {
		resp, err := s.send(context.Background(), chatBody(10, false), "", nil)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			st, _ := http.Get(fmt.Sprintf("http://127.0.0.1:%d/stats?filter=llm_backends.*(retry|cx_connect_fail|rq_total)", s.envoy.adminPort))
			sb, _ := io.ReadAll(st.Body)
			t.Fatalf("request %d with a dead backend: %d %s\n%s", i, resp.StatusCode, b, sb)
		}
	}
	if n := s.envoy.stat(t, "cluster.llm_backends.upstream_rq_retry"); n == 0 {
		t.Fatal("no retries: the dead backend was never chosen, so the test proves nothing")
	}
	// Each retry told tokenlb (x-envoy-attempt-count) that the host it
	// chose failed: three in a row ejected it.
	if got := s.tokenlb.metric(fmt.Sprintf(`tokenlb_host_ejections_total{host=%q,reason="responses"}`, dead.addr)); got != 1 {
		t.Fatalf("the dead host was ejected %v times, want 1", got)
	}
	s.tokenlb.waitIdle()
}

// TestSubsetHintThroughEnvoy: a subset hint Envoy forwards (as a gateway
// implementing the Endpoint Picker Protocol sets it) confines routing to
// its endpoint, however loaded; a hint naming no host gets a 503.
func TestSubsetHintThroughEnvoy(t *testing.T) {
	backends := []*backend{startBackend(t), startBackend(t), startBackend(t)}
	var addrs []string
	s := &stack{byAddr: map[string]*backend{}}
	for _, b := range backends {
		addrs = append(addrs, b.addr)
		s.byAddr[b.addr] = b
	}
	s.backends = backends
	s.tokenlb = startTokenlb(t, addrs, "--prefix-max-extra-load=0")
	s.envoy = startEnvoy(t, envoyOpts{config: "envoy.yaml", Options: envoycfg.Options{TokenlbPort: s.tokenlb.grpcPort,
		Backends: addrs, SubsetHint: []string{addrs[2]}}})
	for range 4 {
		if rec := s.complete(t, chatBody(2000, false), nil); rec.Backend != addrs[2] {
			t.Fatalf("routed to %s, outside the hint %s", rec.Backend, addrs[2])
		}
	}
	// One hint naming no host of tokenlb's: 503.
	other := startEnvoy(t, envoyOpts{config: "envoy.yaml", Options: envoycfg.Options{TokenlbPort: s.tokenlb.grpcPort,
		Backends: addrs, SubsetHint: []string{"127.0.0.1:1"}}})
	resp, err := http.Post(other.url("/v1/chat/completions"), "application/json", bytes.NewReader(chatBody(10, false)))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if code, _ := openAIError(t, resp); resp.StatusCode != 503 || code != "not_in_subset" {
		t.Fatalf("a hint naming no host: %d %s", resp.StatusCode, code)
	}
}
