package processor_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/tokenlb/tokenlb/picker"
	"github.com/tokenlb/tokenlb/processor"
	"github.com/tokenlb/tokenlb/route"
)

const (
	buffered = filterv3.ProcessingMode_BUFFERED
	duplex   = filterv3.ProcessingMode_FULL_DUPLEX_STREAMED
)

var threeHosts = []string{"127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"}

func chat(words int) []byte {
	b, _ := json.Marshal(map[string]any{
		"model":    "m",
		"messages": []map[string]string{{"role": "user", "content": strings.Repeat("hello ", words)}},
	})
	return b
}

func post(body []byte) httpRequest {
	return httpRequest{method: "POST", path: "/v1/chat/completions",
		headers: map[string]string{"content-type": "application/json"}, body: body}
}

// routed runs the request phase and fails unless the request was routed to a
// configured host, in the header and the metadata alike.
func routed(t *testing.T, f *fakeEnvoy, req httpRequest) *outcome {
	t.Helper()
	out, err := f.do(req)
	if err != nil {
		t.Fatalf("request phase: %v", err)
	}
	if out.immediate != nil {
		t.Fatalf("rejected with %d: %s", out.immediate.GetStatus().GetCode(), out.immediate.GetBody())
	}
	h := out.headers[processor.DefaultDestinationHeader]
	md := out.metadata[processor.DefaultDestinationHeader]
	if first, _, _ := strings.Cut(md, ","); h == "" || (h != first && h != md) {
		t.Fatalf("destination header %q, metadata %q", h, out.metadata[processor.DefaultDestinationHeader])
	}
	return out
}

func TestRoutingFollowsLoad(t *testing.T) {
	for _, mode := range []filterv3.ProcessingMode_BodySendMode{buffered, duplex} {
		t.Run(mode.String(), func(t *testing.T) {
			env := startEnv(t, threeHosts, picker.Options{}, Config{})
			// Two long requests held in flight take two hosts.
			a, b := env.open(t, mode), env.open(t, mode)
			ha := routed(t, a, post(chat(3000))).headers[processor.DefaultDestinationHeader]
			hb := routed(t, b, post(chat(2000))).headers[processor.DefaultDestinationHeader]
			if ha == hb {
				t.Fatalf("two heavy requests on one host %s", ha)
			}
			// Every short request now goes to the third host.
			for range 5 {
				c := env.open(t, mode)
				hc := routed(t, c, post(chat(10))).headers[processor.DefaultDestinationHeader]
				if hc == ha || hc == hb {
					t.Fatalf("short request went to busy host %s (busy: %s, %s)", hc, ha, hb)
				}
				if err := c.respond("200"); err != nil {
					t.Fatal(err)
				}
				c.close()
			}
			// The backend answers the first heavy request: its host is free again.
			if err := a.respond("200"); err != nil {
				t.Fatal(err)
			}
			d := env.open(t, mode)
			if hd := routed(t, d, post(chat(500))).headers[processor.DefaultDestinationHeader]; hd == hb {
				t.Fatalf("request went to the still-busy host %s", hd)
			}
			for _, f := range []*fakeEnvoy{a, b, d} {
				f.close()
			}
			env.waitEnded(t, 8)
			if tok, req := env.inFlight(); tok != 0 || req != 0 {
				t.Fatalf("in flight after all closed: %d tokens, %d requests", tok, req)
			}
		})
	}
}

// TestReleasedAtResponseHeaders checks that the charge ends when the backend
// answers, not when Envoy gets round to closing the stream.
func TestReleasedAtResponseHeaders(t *testing.T) {
	env := startEnv(t, threeHosts, picker.Options{}, Config{})
	f := env.open(t, buffered)
	routed(t, f, post(chat(100)))
	if tok, _ := env.inFlight(); tok == 0 {
		t.Fatal("nothing charged while the request is in flight")
	}
	if err := f.respond("200"); err != nil {
		t.Fatal(err)
	}
	if tok, req := env.inFlight(); tok != 0 || req != 0 {
		t.Fatalf("after response headers: %d tokens, %d requests in flight", tok, req)
	}
	if got := env.picker.Stats().Releases[route.ReleasedAtHeaders]; got != 1 {
		t.Fatalf("releases by response_headers = %d, want 1", got)
	}
	f.close()
	env.waitEnded(t, 1)
	if s := env.picker.Stats(); s.Releases[route.ReleasedStreamEnd] != 0 {
		t.Fatalf("released twice: %+v", s.Releases)
	}
}

func TestSpoofedDestinationOverwritten(t *testing.T) {
	cases := []struct {
		name string
		mode filterv3.ProcessingMode_BodySendMode
		req  httpRequest
	}{
		{"buffered body", buffered, post(chat(5))},
		{"full duplex body", duplex, post(chat(5))},
		{"no body", buffered, httpRequest{method: "GET", path: "/v1/models"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			env := startEnv(t, threeHosts, picker.Options{}, Config{})
			for _, spoof := range []string{"6.6.6.6:6666", "127.0.0.1:9", threeHosts[0] + ",6.6.6.6:1"} {
				c.req.headers = map[string]string{"content-type": "application/json", processor.DefaultDestinationHeader: spoof}
				f := env.open(t, c.mode)
				out := routed(t, f, c.req)
				got := out.headers[processor.DefaultDestinationHeader]
				if !contains(threeHosts, got) {
					t.Fatalf("spoofed %q: destination %q is not a configured host", spoof, got)
				}
				f.close()
			}
		})
	}
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

func TestCustomDestinationHeader(t *testing.T) {
	env := startEnv(t, threeHosts, picker.Options{}, Config{DestinationHeader: "X-LLM-Target"})
	f := env.open(t, buffered)
	out, err := f.do(post(chat(5)))
	if err != nil {
		t.Fatal(err)
	}
	if got := out.headers["x-llm-target"]; !contains(threeHosts, got) || out.metadata["x-llm-target"] != got {
		t.Fatalf("x-llm-target = %q, metadata %v", got, out.metadata)
	}
	f.close()
}

func TestNoBodyIsRoutedAtZeroCost(t *testing.T) {
	for _, req := range []httpRequest{
		{method: "GET", path: "/v1/models"},
		{method: "GET", path: "/v1/chat/completions?limit=10"}, // list stored completions
		{method: "DELETE", path: "/v1/responses"},
	} {
		env := startEnv(t, threeHosts, picker.Options{}, Config{})
		f := env.open(t, duplex)
		routed(t, f, req)
		if tok, n := env.inFlight(); tok != 0 || n != 1 {
			t.Fatalf("%s %s in flight: %d tokens, %d requests; want 0, 1", req.method, req.path, tok, n)
		}
		f.close()
		env.waitEnded(t, 1)
	}
}

// TestTrailersWithoutBody covers an HTTP/2 request of HEADERS then TRAILERS:
// in BUFFERED mode Envoy sends no body message, so tokenlb can never set the
// destination. The client's own destination header must already be gone
// after the headers reply, and the request is refused.
func TestTrailersWithoutBody(t *testing.T) {
	env := startEnv(t, threeHosts, picker.Options{}, Config{})
	f := env.open(t, buffered)
	req := post(chat(5))
	req.headers[processor.DefaultDestinationHeader] = "6.6.6.6:1"
	if err := f.sendHeaders(req); err != nil {
		t.Fatal(err)
	}
	resp, err := f.stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	out := &outcome{headers: map[string]string{processor.DefaultDestinationHeader: "6.6.6.6:1"}, metadata: map[string]string{}}
	apply(out, resp.GetRequestHeaders().GetResponse(), resp)
	if v, ok := out.headers[processor.DefaultDestinationHeader]; ok {
		t.Fatalf("client destination %q survives the headers reply", v)
	}
	if err := f.send(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestTrailers{
		RequestTrailers: &extprocv3.HttpTrailers{}}}); err != nil {
		t.Fatal(err)
	}
	resp, err = f.stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if ir := resp.GetImmediateResponse(); ir == nil || ir.GetStatus().GetCode() != 400 {
		t.Fatalf("trailers without body: reply %v, want 400", resp)
	}
	f.close()
	env.waitEnded(t, 1)
	if tok, n := env.inFlight(); tok != 0 || n != 0 {
		t.Fatalf("in flight: %d, %d", tok, n)
	}
}

// TestNoProtocolConfig: an Envoy that sends no protocol_config is treated as
// BUFFERED.
func TestNoProtocolConfig(t *testing.T) {
	env := startEnv(t, threeHosts, picker.Options{}, Config{})
	f := env.open(t, buffered)
	f.noProtocolConfig = true
	routed(t, f, post(chat(20)))
	f.close()
}

func TestFullDuplexEchoesBody(t *testing.T) {
	// A 300 KB prompt of multi-byte text, sent in odd-sized chunks.
	content := strings.Repeat("naïve 日本語 😀 text ", 12000)
	body, _ := json.Marshal(map[string]any{"messages": []map[string]string{{"role": "user", "content": content}}})
	env := startEnv(t, threeHosts, picker.Options{}, Config{})
	f := env.open(t, duplex)
	req := post(body)
	req.chunk = 16381
	out := routed(t, f, req)
	if !bytes.Equal(out.body, body) {
		t.Fatalf("echoed body differs: got %d bytes, want %d", len(out.body), len(body))
	}
	if want := (len(body) + processor.ChunkBytes - 1) / processor.ChunkBytes; out.chunks != want {
		t.Fatalf("streamed %d chunks, want %d", out.chunks, want)
	}
	// A duplicate end of stream must not route (or charge) again.
	if err := f.sendBody([]byte("{}"), true); err != nil {
		t.Fatal(err)
	}
	if err := f.respond("200"); err != nil {
		t.Fatal(err)
	}
	f.close()
	env.waitEnded(t, 1)
	var picks uint64
	for _, h := range env.picker.Hosts() {
		picks += h.Picks
	}
	if picks != 1 {
		t.Fatalf("%d picks for one request", picks)
	}
}

func TestFullDuplexTrailersEndBody(t *testing.T) {
	env := startEnv(t, threeHosts, picker.Options{}, Config{})
	f := env.open(t, duplex)
	body := chat(20)
	req := post(body)
	if err := f.sendHeaders(req); err != nil {
		t.Fatal(err)
	}
	if err := f.sendBody(body, false); err != nil {
		t.Fatal(err)
	}
	if err := f.send(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestTrailers{
		RequestTrailers: &extprocv3.HttpTrailers{}}}); err != nil {
		t.Fatal(err)
	}
	var got []byte
	for phase := 0; phase < 3; phase++ {
		resp, err := f.stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		switch phase {
		case 0:
			if resp.GetRequestHeaders() == nil {
				t.Fatalf("reply 1 is %T", resp.Response)
			}
		case 1:
			sr := resp.GetRequestBody().GetResponse().GetBodyMutation().GetStreamedResponse()
			got = sr.GetBody()
		case 2:
			if resp.GetRequestTrailers() == nil {
				t.Fatalf("reply 3 is %T", resp.Response)
			}
		}
	}
	if !bytes.Equal(got, body) {
		t.Fatalf("echoed %q, want %q", got, body)
	}
	f.close()
}

// errorBody checks an immediate response's OpenAI-shaped JSON and returns its
// error code.
func errorBody(t *testing.T, ir *extprocv3.ImmediateResponse) string {
	t.Helper()
	var v struct {
		Error struct {
			Message, Type, Code string
		}
	}
	if err := json.Unmarshal(ir.GetBody(), &v); err != nil {
		t.Fatalf("error body %q is not JSON: %v", ir.GetBody(), err)
	}
	if v.Error.Message == "" || v.Error.Type == "" || v.Error.Code == "" {
		t.Fatalf("error body %s lacks message, type or code", ir.GetBody())
	}
	ct := ""
	for _, h := range ir.GetHeaders().GetSetHeaders() {
		if h.GetHeader().GetKey() == "content-type" {
			ct = headerValue(h.GetHeader())
		}
	}
	if ct != "application/json" {
		t.Fatalf("content-type %q", ct)
	}
	return v.Error.Code
}

func TestRejections(t *testing.T) {
	deep := `{"messages":` + strings.Repeat("[", 5000) + strings.Repeat("]", 5000) + `}`
	cases := []struct {
		name       string
		mode       filterv3.ProcessingMode_BodySendMode
		req        httpRequest
		maxBody    int64
		status     int32
		code       string
		retryAfter bool
	}{
		{name: "invalid JSON", req: post([]byte(`{"messages": [`)), status: 400, code: "invalid_json"},
		{name: "invalid JSON full duplex", mode: duplex, req: post([]byte(`not json`)), status: 400, code: "invalid_json"},
		{name: "nothing to count", req: post([]byte(`{"model":"m","messages":[]}`)), status: 400, code: "missing_prompt"},
		{name: "an array", req: post([]byte(`[{"role":"user","content":"hello"}]`)), status: 400, code: "invalid_type"},
		{name: "null", req: post([]byte(`null`)), status: 400, code: "invalid_type"},
		{name: "a string full duplex", mode: duplex, req: post([]byte(`"hello"`)), status: 400, code: "invalid_type"},
		{name: "POST without body", req: httpRequest{method: "POST", path: "/v1/completions"}, status: 400, code: "missing_prompt"},
		{name: "deeply nested", req: post([]byte(deep)), status: 400, code: "json_too_deep"},
		{name: "content-length over limit", maxBody: 1000,
			req:    httpRequest{method: "POST", path: "/v1/chat/completions", headers: map[string]string{"content-length": "5000"}, body: chat(900)},
			status: 413, code: "request_too_large"},
		{name: "buffered body over limit", maxBody: 1000, req: post(chat(900)), status: 413, code: "request_too_large"},
		{name: "full-duplex body over limit", mode: duplex, maxBody: 1000,
			req:    httpRequest{method: "POST", path: "/v1/chat/completions", body: chat(900), chunk: 300},
			status: 413, code: "request_too_large"},
		{name: "not JSON content type",
			req:    httpRequest{method: "POST", path: "/v1/chat/completions", headers: map[string]string{"content-type": "text/plain"}, body: []byte("hi")},
			status: 415, code: "unsupported_media_type"},
		{name: "streamed body mode is a proxy misconfiguration", mode: filterv3.ProcessingMode_STREAMED, req: post(chat(5)),
			status: 500, code: "proxy_misconfigured"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			env := startEnv(t, threeHosts, picker.Options{}, Config{MaxBodyBytes: c.maxBody})
			mode := c.mode
			if mode == filterv3.ProcessingMode_NONE {
				mode = buffered
			}
			f := env.open(t, mode)
			out, err := f.do(c.req)
			if err != nil {
				t.Fatal(err)
			}
			if out.immediate == nil {
				t.Fatalf("routed to %s, want %d", out.headers[processor.DefaultDestinationHeader], c.status)
			}
			if got := int32(out.immediate.GetStatus().GetCode()); got != c.status {
				t.Fatalf("status %d, want %d (%s)", got, c.status, out.immediate.GetBody())
			}
			if got := errorBody(t, out.immediate); got != c.code {
				t.Fatalf("code %q, want %q", got, c.code)
			}
			f.close()
			env.waitEnded(t, 1)
			if tok, req := env.inFlight(); tok != 0 || req != 0 {
				t.Fatalf("in flight after rejection: %d tokens, %d requests", tok, req)
			}
		})
	}
}

func TestNoCapacity(t *testing.T) {
	env := startEnv(t, threeHosts[:1], picker.Options{MaxInFlightTokens: 500}, Config{})
	held := env.open(t, buffered)
	routed(t, held, post(chat(300)))
	f := env.open(t, buffered)
	out, err := f.do(post(chat(300)))
	if err != nil {
		t.Fatal(err)
	}
	if out.immediate == nil || out.immediate.GetStatus().GetCode() != 429 {
		t.Fatalf("want 429, got %+v", out)
	}
	if got := errorBody(t, out.immediate); got != "no_capacity" {
		t.Fatalf("code %q", got)
	}
	retry := ""
	for _, h := range out.immediate.GetHeaders().GetSetHeaders() {
		if h.GetHeader().GetKey() == "retry-after" {
			retry = headerValue(h.GetHeader())
		}
	}
	if retry != "1" {
		t.Fatalf("retry-after = %q, want 1", retry)
	}
	held.close()
	f.close()
}

// TestLargeBufferedBody sends a body above grpc-go's default 4 MiB message
// limit, as Envoy does with an 8 MiB buffer limit.
func TestLargeBufferedBody(t *testing.T) {
	env := startEnv(t, threeHosts, picker.Options{}, Config{})
	body := []byte(`{"prompt":[` + strings.Repeat("1,", 3<<20) + `1]}`)
	f := env.open(t, buffered)
	req := httpRequest{method: "POST", path: "/v1/completions", headers: map[string]string{"content-type": "application/json"}, body: body}
	routed(t, f, req)
	if tok, _ := env.inFlight(); tok != 3<<20+1 {
		t.Fatalf("charged %d tokens, want %d", tok, 3<<20+1)
	}
	f.close()
}

func TestAborts(t *testing.T) {
	cases := []struct {
		name string
		mode filterv3.ProcessingMode_BodySendMode
		run  func(t *testing.T, f *fakeEnvoy)
	}{
		{"before body", buffered, func(t *testing.T, f *fakeEnvoy) {
			if err := f.sendHeaders(post(chat(50))); err != nil {
				t.Fatal(err)
			}
			if _, err := f.stream.Recv(); err != nil {
				t.Fatal(err)
			}
			f.abort()
		}},
		{"full duplex mid-body", duplex, func(t *testing.T, f *fakeEnvoy) {
			if err := f.sendHeaders(post(chat(50))); err != nil {
				t.Fatal(err)
			}
			if err := f.sendBody([]byte(`{"messages":`), false); err != nil {
				t.Fatal(err)
			}
			f.abort()
		}},
		{"after body, before response headers", buffered, func(t *testing.T, f *fakeEnvoy) {
			routed(t, f, post(chat(50)))
			f.abort()
		}},
		{"graceful close before response headers", duplex, func(t *testing.T, f *fakeEnvoy) {
			routed(t, f, post(chat(50)))
			f.close()
		}},
		{"after response headers", buffered, func(t *testing.T, f *fakeEnvoy) {
			routed(t, f, post(chat(50)))
			if err := f.respond("503"); err != nil {
				t.Fatal(err)
			}
			f.abort()
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			env := startEnv(t, threeHosts, picker.Options{}, Config{})
			c.run(t, env.open(t, c.mode))
			env.waitEnded(t, 1)
			if tok, req := env.inFlight(); tok != 0 || req != 0 {
				t.Fatalf("in flight after abort: %d tokens, %d requests", tok, req)
			}
			s := env.picker.Stats()
			var n uint64
			for _, v := range s.Releases {
				n += v
			}
			if s.OpenLeases != 0 || n > 1 {
				t.Fatalf("leases open %d, releases %v", s.OpenLeases, s.Releases)
			}
		})
	}
}

// TestConcurrentStreamsWithAborts runs 2,000 streams at once, a third of them
// aborted at a random point, and checks that every host ends at exactly zero
// and no goroutine is left behind.
func TestConcurrentStreamsWithAborts(t *testing.T) {
	// Registered first, so it runs after startEnv's cleanup stopped the server.
	before := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, before) })
	const n = 2000
	env := startEnv(t, threeHosts, picker.Options{}, Config{})
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		rng := rand.New(rand.NewPCG(uint64(i), 7))
		mode := buffered
		if i%2 == 1 {
			mode = duplex
		}
		wg.Go(func() {
			f := env.open(t, mode)
			req := post(chat(1 + rng.IntN(400)))
			switch rng.IntN(6) {
			case 0: // abort before the body
				if err := f.sendHeaders(req); err != nil {
					errs <- err
				}
				f.abort()
			case 1: // abort while the request is at the backend
				if _, err := f.do(req); err != nil {
					errs <- err
				}
				f.abort()
			default: // complete
				out, err := f.do(req)
				if err == nil && out.immediate != nil {
					err = fmt.Errorf("rejected: %s", out.immediate.GetBody())
				}
				if err == nil {
					err = f.respond("200")
				}
				if err != nil {
					errs <- err
				}
				f.close()
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	env.waitEnded(t, n)
	if tok, req := env.inFlight(); tok != 0 || req != 0 {
		t.Fatalf("after %d streams: %d tokens, %d requests in flight", n, tok, req)
	}
	if s := env.picker.Stats(); s.OpenLeases != 0 || s.SweptTokens != 0 {
		t.Fatalf("stats after run: %+v", s)
	}
}

// TestFallbackList checks the Endpoint Picker Protocol list in the metadata:
// the chosen host (the header's value) first, then the others, least loaded
// first.
func TestFallbackList(t *testing.T) {
	env := startEnv(t, threeHosts, picker.Options{}, Config{Fallbacks: 2})
	held := env.open(t, buffered)
	busy := routed(t, held, post(chat(2000))).headers[processor.DefaultDestinationHeader]
	f := env.open(t, buffered)
	out, err := f.do(post(chat(5)))
	if err != nil {
		t.Fatal(err)
	}
	list := strings.Split(out.metadata[processor.DefaultDestinationHeader], ",")
	if len(list) != 3 || list[0] != out.headers[processor.DefaultDestinationHeader] || list[2] != busy || list[1] == busy || list[0] == busy {
		t.Fatalf("metadata list %v (header %s, busy host %s)", list, out.headers[processor.DefaultDestinationHeader], busy)
	}
	held.close()
	f.close()
}

// TestDestinationList: with DestinationList, the header carries the same
// ordered list as the metadata (the Endpoint Picker Protocol: they never
// differ).
func TestDestinationList(t *testing.T) {
	env := startEnv(t, threeHosts, picker.Options{}, Config{Fallbacks: 2, DestinationList: true})
	out := routed(t, env.open(t, buffered), post(chat(5)))
	header, md := out.headers[processor.DefaultDestinationHeader], out.metadata[processor.DefaultDestinationHeader]
	if header != md || len(strings.Split(header, ",")) != 3 {
		t.Fatalf("header %q, metadata %q: want the same list of 3", header, md)
	}
}

// TestStreamedResponseHeldUntilBodyEnds: with the response body shown to
// tokenlb (STREAMED), an SSE response whose headers come before the first
// token keeps its charge until the body ends.
func TestStreamedResponseHeldUntilBodyEnds(t *testing.T) {
	env := startEnv(t, threeHosts, picker.Options{}, Config{})
	f := env.open(t, buffered)
	f.respMode = filterv3.ProcessingMode_STREAMED
	routed(t, f, post(chat(100)))
	step := func(r *extprocv3.ProcessingRequest) {
		t.Helper()
		if err := f.send(r); err != nil {
			t.Fatal(err)
		}
		if _, err := f.stream.Recv(); err != nil {
			t.Fatal(err)
		}
	}
	step(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{
		ResponseHeaders: &extprocv3.HttpHeaders{EndOfStream: false}}})
	if tok, _ := env.inFlight(); tok == 0 {
		t.Fatal("charge released at the headers of a streamed response")
	}
	step(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{
		ResponseBody: &extprocv3.HttpBody{Body: []byte("data: {}\n\n")}}})
	if tok, _ := env.inFlight(); tok == 0 {
		t.Fatal("charge released mid-stream")
	}
	step(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{
		ResponseBody: &extprocv3.HttpBody{Body: []byte("data: [DONE]\n\n"), EndOfStream: true}}})
	if tok, n := env.inFlight(); tok != 0 || n != 0 {
		t.Fatalf("after the body ended: %d tokens, %d requests", tok, n)
	}
	if got := env.picker.Stats().Releases[route.ReleasedAtEnd]; got != 1 {
		t.Fatalf("releases by response_end = %d", got)
	}
	f.close()
}

// TestUnknownModel: with model routing, a model no host serves gets a 404
// naming it; without, the request is routed.
func TestUnknownModel(t *testing.T) {
	for _, routing := range []bool{true, false} {
		env := startEnv(t, threeHosts, picker.Options{}, Config{ModelRouting: routing})
		for _, h := range threeHosts {
			env.picker.SetModels(h, []string{"llama"})
		}
		f := env.open(t, buffered)
		out, err := f.do(post([]byte(`{"model":"gpt-x","messages":[{"role":"user","content":"hi"}]}`)))
		if err != nil {
			t.Fatal(err)
		}
		if !routing {
			if out.immediate != nil {
				t.Fatalf("model routing off: rejected with %s", out.immediate.GetBody())
			}
			f.close()
			continue
		}
		if out.immediate == nil || out.immediate.GetStatus().GetCode() != 404 {
			t.Fatalf("want 404, got %+v", out)
		}
		var v struct {
			Error struct{ Message, Type, Code, Param string }
		}
		if err := json.Unmarshal(out.immediate.GetBody(), &v); err != nil || v.Error.Code != "model_not_found" ||
			v.Error.Param != "model" || v.Error.Type != "invalid_request_error" || !strings.Contains(v.Error.Message, "gpt-x") {
			t.Fatalf("404 body %s (%v)", out.immediate.GetBody(), err)
		}
		f.close()
		env.waitEnded(t, 1)
		if tok, req := env.inFlight(); tok != 0 || req != 0 {
			t.Fatalf("in flight after a 404: %d tokens, %d requests", tok, req)
		}
	}
}

// subsetMetadata is the Endpoint Picker Protocol's subset hint as Envoy
// forwards it: a list, or one comma-separated string.
func subsetMetadata(t *testing.T, v any) *corev3.Metadata {
	t.Helper()
	fields, err := structpb.NewStruct(map[string]any{processor.SubsetKey: v})
	if err != nil {
		t.Fatal(err)
	}
	return &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{processor.SubsetNamespace: fields}}
}

// TestSubsetHint: a request is routed only inside the subset the data
// plane allows (however loaded the rest), in either form; a subset that
// leaves no endpoint gets a 503.
func TestSubsetHint(t *testing.T) {
	env := startEnv(t, threeHosts, picker.Options{}, Config{})
	for _, hint := range []any{[]any{threeHosts[1]}, " " + threeHosts[1] + " "} {
		for range 3 {
			req := post(chat(500))
			req.metadata = subsetMetadata(t, hint)
			out := routed(t, env.open(t, buffered), req)
			if got := out.headers[processor.DefaultDestinationHeader]; got != threeHosts[1] {
				t.Fatalf("hint %v: routed to %s", hint, got)
			}
		}
	}
	for _, hint := range []any{[]any{}, "10.9.9.9:80"} {
		req := post(chat(10))
		req.metadata = subsetMetadata(t, hint)
		out, err := env.open(t, buffered).do(req)
		if err != nil {
			t.Fatal(err)
		}
		if out.immediate == nil || out.immediate.GetStatus().GetCode() != 503 || errorBody(t, out.immediate) != "not_in_subset" {
			t.Fatalf("hint %v: %+v", hint, out)
		}
	}
}

// TestAnthropicErrors: tokenlb's own answers on Anthropic's Messages API
// are in Anthropic's error shape, with its type for the status; the same
// rejection on an OpenAI path is in OpenAI's.
func TestAnthropicErrors(t *testing.T) {
	env := startEnv(t, threeHosts, picker.Options{}, Config{ModelRouting: true})
	for _, h := range threeHosts {
		env.picker.SetModels(h, []string{"claude-small"})
	}
	for _, tc := range []struct {
		name, path, body string
		status           int32
		anthropicType    string
	}{
		{"invalid JSON", "/v1/messages", `{"messages": [`, 400, "invalid_request_error"},
		{"not an object", "/v1/messages", `[]`, 400, "invalid_request_error"},
		{"unknown model", "/v1/messages", `{"model":"claude-x","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}`, 404, "not_found_error"},
		{"OpenAI path", "/v1/chat/completions", `{"messages": [`, 400, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := env.open(t, buffered)
			defer f.close()
			out, err := f.do(httpRequest{method: "POST", path: tc.path, body: []byte(tc.body)})
			if err != nil {
				t.Fatal(err)
			}
			if out.immediate == nil || int32(out.immediate.GetStatus().GetCode()) != tc.status {
				t.Fatalf("want %d, got %+v", tc.status, out)
			}
			if tc.anthropicType == "" {
				errorBody(t, out.immediate)
				return
			}
			var v struct {
				Type  string `json:"type"`
				Error struct {
					Type, Message string
				} `json:"error"`
			}
			if err := json.Unmarshal(out.immediate.GetBody(), &v); err != nil || v.Type != "error" ||
				v.Error.Type != tc.anthropicType || v.Error.Message == "" {
				t.Fatalf("body %s: want Anthropic's shape with type %s", out.immediate.GetBody(), tc.anthropicType)
			}
		})
	}
}

// TestModelsList: GET /v1/models is answered by tokenlb with every model
// the hosts serve, each once, in OpenAI's list shape (Anthropic's when the
// client sends anthropic-version); a down host's models are listed too, as
// requests for them are still routed there; GET /v1/models/{id} answers one
// model (its id percent-encoded or not) or 404; with no host's models
// known, the request is routed as before.
func TestModelsList(t *testing.T) {
	env := startEnv(t, threeHosts, picker.Options{}, Config{})
	get := func(path string, headers map[string]string) *outcome {
		t.Helper()
		f := env.open(t, buffered)
		defer f.close()
		out, err := f.do(httpRequest{method: "GET", path: path, headers: headers})
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	if out := get("/v1/models", nil); out.immediate != nil {
		t.Fatalf("no models known: answered %s, want routed", out.immediate.GetBody())
	}
	env.picker.SetModels(threeHosts[0], []string{"llama", "qwen"})
	env.picker.SetModels(threeHosts[1], []string{"qwen", "mistral"})
	env.picker.SetModels(threeHosts[2], []string{"org/down-host-model"})
	env.picker.SetHealth(threeHosts[2], picker.Health{Down: true})

	out := get("/v1/models?limit=5", nil)
	if out.immediate == nil || out.immediate.GetStatus().GetCode() != 200 {
		t.Fatalf("want tokenlb's 200, got %+v", out)
	}
	var list struct {
		Object string
		Data   []struct{ ID, Object string }
	}
	if err := json.Unmarshal(out.immediate.GetBody(), &list); err != nil || list.Object != "list" {
		t.Fatalf("list %s (%v)", out.immediate.GetBody(), err)
	}
	var ids []string
	for _, m := range list.Data {
		if m.Object != "model" {
			t.Fatalf("entry %+v", m)
		}
		ids = append(ids, m.ID)
	}
	if want := []string{"llama", "mistral", "org/down-host-model", "qwen"}; !slices.Equal(ids, want) {
		t.Fatalf("models %v, want %v (every host's, each once)", ids, want)
	}

	out = get("/v1/models", map[string]string{"anthropic-version": "2023-06-01"})
	var alist struct {
		Data []struct {
			Type string `json:"type"`
			ID   string `json:"id"`
		}
		HasMore bool   `json:"has_more"`
		FirstID string `json:"first_id"`
		LastID  string `json:"last_id"`
	}
	if err := json.Unmarshal(out.immediate.GetBody(), &alist); err != nil || len(alist.Data) != 4 || alist.Data[0].Type != "model" ||
		alist.Data[0].ID != "llama" || alist.FirstID != "llama" || alist.LastID != "qwen" || alist.HasMore {
		t.Fatalf("Anthropic list %s (%v)", out.immediate.GetBody(), err)
	}

	if out := get("/v1/models/qwen", nil); out.immediate.GetStatus().GetCode() != 200 || !strings.Contains(string(out.immediate.GetBody()), `"id":"qwen"`) {
		t.Fatalf("one model: %d %s", out.immediate.GetStatus().GetCode(), out.immediate.GetBody())
	}
	for _, path := range []string{"/v1/models/org/down-host-model", "/v1/models/org%2Fdown-host-model"} {
		if out := get(path, nil); out.immediate.GetStatus().GetCode() != 200 || !strings.Contains(string(out.immediate.GetBody()), `"id":"org/down-host-model"`) {
			t.Fatalf("%s: %d %s", path, out.immediate.GetStatus().GetCode(), out.immediate.GetBody())
		}
	}
	if out := get("/v1/models/nobody-serves-it", nil); out.immediate.GetStatus().GetCode() != 404 || errorBody(t, out.immediate) != "model_not_found" {
		t.Fatalf("an unknown model: %d %s", out.immediate.GetStatus().GetCode(), out.immediate.GetBody())
	}
	if n := env.counter(t, "tokenlb_rejections_total", "models"); n != 0 {
		t.Fatalf("the list counted as %v rejections", n)
	}
	if out := get("/v1/models-other", nil); out.immediate != nil {
		t.Fatalf("another path answered: %s", out.immediate.GetBody())
	}
}
