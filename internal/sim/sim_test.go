package sim

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"
)

func start(t *testing.T, cfg Config) *httptest.Server {
	t.Helper()
	s := New(cfg)
	ctx, cancel := context.WithCancel(context.Background())
	go s.Run(ctx)
	srv := httptest.NewServer(s)
	t.Cleanup(func() { srv.Close(); cancel() })
	return srv
}

// words returns n distinct 4-letter words: n llmsim tokens.
func words(n int, seed int) string {
	var b strings.Builder
	for i := range n {
		b.WriteString(strconv.FormatInt(int64(1000+(i*7919+seed*104729)%9000), 10))
		b.WriteByte(' ')
	}
	return b.String()
}

func body(prompt string, stream bool, maxTokens int) []byte {
	b, _ := json.Marshal(map[string]any{"model": "m", "stream": stream, "max_tokens": maxTokens,
		"stream_options": map[string]bool{"include_usage": true},
		"messages":       []map[string]string{{"role": "user", "content": prompt}}})
	return b
}

type result struct {
	ttft, e2e time.Duration
	events    int
	usage     map[string]int
}

// stream sends a streaming request and times its first token and its end.
func stream(t *testing.T, ctx context.Context, url string, b []byte) result {
	t.Helper()
	start := time.Now()
	req, _ := http.NewRequestWithContext(ctx, "POST", url+"/v1/chat/completions", bytes.NewReader(b))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		if ctx.Err() == nil {
			t.Error(err)
		}
		return result{}
	}
	defer resp.Body.Close()
	var r result
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok || line == "[DONE]" {
			continue
		}
		var ev struct {
			Choices []any
			Usage   map[string]int
		}
		json.Unmarshal([]byte(line), &ev)
		if len(ev.Choices) > 0 {
			if r.events == 0 {
				r.ttft = time.Since(start)
			}
			r.events++
		}
		if ev.Usage != nil {
			r.usage = ev.Usage
		}
	}
	r.e2e = time.Since(start)
	return r
}

func metric(t *testing.T, url, name string) float64 {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

func waitMetric(t *testing.T, url, name string, want float64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for metric(t, url, name) != want {
		if time.Now().After(deadline) {
			t.Fatalf("%s never reached %v (is %v)", name, want, metric(t, url, name))
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func TestLongPromptTTFT(t *testing.T) {
	// 50 µs per prefill token at time scale 0.5: 6,000 more prompt tokens
	// cost 150 ms more before the first token.
	srv := start(t, Config{TimeScale: 0.5})
	short := stream(t, context.Background(), srv.URL, body(words(10, 1), true, 2))
	long := stream(t, context.Background(), srv.URL, body(words(6010, 2), true, 2))
	extra := long.ttft - short.ttft
	if extra < 120*time.Millisecond || extra > 400*time.Millisecond {
		t.Fatalf("TTFT short %v, long %v: the long prompt should add about 150 ms", short.ttft, long.ttft)
	}
}

func TestQueueBeyondMaxNumSeqs(t *testing.T) {
	// Each answer is max_tokens long (IgnoreEOS) and would run for about 17
	// s, so the three are still there, two running and one waiting, however
	// late the third arrives; they end when the test cancels them.
	srv := start(t, Config{MaxNumSeqs: 2, TimeScale: 0.2, IgnoreEOS: true})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan result, 3)
	for i := range 3 {
		go func() { done <- stream(t, ctx, srv.URL, body(words(20, i), true, 20000)) }()
	}
	// All three arrive: two run, the third waits, and no more ever run.
	deadline := time.Now().Add(10 * time.Second)
	for {
		running, waiting := metric(t, srv.URL, "vllm:num_requests_running"), metric(t, srv.URL, "vllm:num_requests_waiting")
		if running > 2 {
			t.Fatalf("%v requests running with max-num-seqs 2", running)
		}
		if running == 2 && waiting == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("never 2 running and 1 waiting (now %v, %v)", running, waiting)
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	for range 3 {
		<-done
	}
	// Cancelled requests leave the batch and free their KV blocks.
	waitMetric(t, srv.URL, "vllm:num_requests_running", 0)
	waitMetric(t, srv.URL, "vllm:kv_cache_usage_perc", 0)
}

func TestRepeatedPrefixIsFaster(t *testing.T) {
	// Time scale 1: 200 ms of prefill saved, far above the noise of a
	// loaded machine.
	srv := start(t, Config{TimeScale: 1})
	doc := words(4000, 3)
	first := stream(t, context.Background(), srv.URL, body(doc+"first question", true, 2))
	second := stream(t, context.Background(), srv.URL, body(doc+"second question", true, 2))
	if second.ttft*2 > first.ttft {
		t.Fatalf("TTFT with a cached 4,000-token prefix %v, without %v", second.ttft, first.ttft)
	}
	hits := metric(t, srv.URL, "vllm:prefix_cache_hits_total")
	if hits < 3900 || hits > 4010 {
		t.Fatalf("prefix cache hits %v tokens, want about 4,000", hits)
	}
}

func TestUsageAndMetrics(t *testing.T) {
	srv := start(t, Config{TimeScale: 0.01})
	// Template: "<|start|>" (9 bytes) 3 tokens, "user" 1, "<|content|>" 3,
	// "<|end|>" 2: 100 words + 9.
	r := stream(t, context.Background(), srv.URL, body(words(100, 4), true, 7))
	if r.events != 7 || r.usage["prompt_tokens"] != 109 || r.usage["completion_tokens"] != 7 {
		t.Fatalf("events %d, usage %v", r.events, r.usage)
	}
	resp, err := http.Post(srv.URL+"/v1/completions", "application/json", strings.NewReader(`{"prompt":"`+words(50, 5)+`","max_tokens":3}`))
	if err != nil {
		t.Fatal(err)
	}
	var v struct {
		Choices []struct{ Text string }
		Usage   map[string]int
	}
	json.NewDecoder(resp.Body).Decode(&v)
	resp.Body.Close()
	if v.Usage["prompt_tokens"] != 50 || v.Usage["completion_tokens"] != 3 || len(v.Choices) != 1 {
		t.Fatalf("completions response %+v", v)
	}
	if got := metric(t, srv.URL, "vllm:prompt_tokens_total"); got != 159 {
		t.Fatalf("prompt tokens %v, want 159", got)
	}
	if got := metric(t, srv.URL, "vllm:generation_tokens_total"); got != 10 {
		t.Fatalf("generation tokens %v, want 10", got)
	}
	if got := metric(t, srv.URL, "vllm:e2e_request_latency_seconds_count"); got != 2 {
		t.Fatalf("e2e latency count %v, want 2", got)
	}
}

func TestBadRequests(t *testing.T) {
	srv := start(t, Config{KVBlocks: 4, BlockSize: 16, TimeScale: 0.01})
	for _, b := range []string{`{`, `{"messages":[]}`, `{"prompt":"` + words(100, 6) + `","max_tokens":5}`} {
		resp, err := http.Post(srv.URL+"/v1/completions", "application/json", strings.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 400 {
			t.Fatalf("%.30s: status %d", b, resp.StatusCode)
		}
	}
}

// TestFinishReason: an answer ends at its own length with finish_reason
// "stop", or at max_tokens with "length" when that comes first, streamed or
// not; with IgnoreEOS it is max_tokens long.
func TestFinishReason(t *testing.T) {
	for _, tc := range []struct {
		name      string
		ignoreEOS bool
		maxTokens int
		finish    string
		tokens    func(n int) bool
	}{
		{"open-ended", false, 0, "stop", func(n int) bool { return n >= 1 && n <= 8*Defaults.OutputMedian }},
		{"cut by max_tokens", false, 3, "length", func(n int) bool { return n == 3 }},
		{"shorter than max_tokens", false, 50000, "stop", func(n int) bool { return n < 50000 }},
		{"ignore_eos", true, 40, "length", func(n int) bool { return n == 40 }},
		{"ignore_eos, open-ended", true, 0, "stop", func(n int) bool { return n >= 1 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := start(t, Config{TimeScale: 0.001, IgnoreEOS: tc.ignoreEOS})
			for _, streamed := range []bool{false, true} {
				req := map[string]any{"model": "m", "stream": streamed, "stream_options": map[string]bool{"include_usage": true},
					"messages": []map[string]string{{"role": "user", "content": words(20, 1)}}}
				if tc.maxTokens > 0 {
					req["max_tokens"] = tc.maxTokens
				}
				b, _ := json.Marshal(req)
				resp, err := http.Post(srv.URL+"/v1/chat/completions", "application/json", bytes.NewReader(b))
				if err != nil {
					t.Fatal(err)
				}
				raw, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				finish, n := finishOf(t, raw, streamed)
				if finish != tc.finish || !tc.tokens(n) {
					t.Fatalf("streamed %v: finish_reason %q after %d tokens, want %q", streamed, finish, n, tc.finish)
				}
			}
		})
	}
}

// finishOf reads a chat answer's finish_reason and completion tokens, from
// a whole response or from an event stream's chunks.
func finishOf(t *testing.T, raw []byte, streamed bool) (finish string, tokens int) {
	t.Helper()
	type answer struct {
		Choices []struct {
			FinishReason *string `json:"finish_reason"`
		}
		Usage map[string]int
	}
	if !streamed {
		var a answer
		if err := json.Unmarshal(raw, &a); err != nil || len(a.Choices) != 1 || a.Choices[0].FinishReason == nil {
			t.Fatalf("answer %s: %v", raw, err)
		}
		return *a.Choices[0].FinishReason, a.Usage["completion_tokens"]
	}
	for _, line := range strings.Split(string(raw), "\n") {
		data, ok := strings.CutPrefix(line, "data: ")
		if !ok || data == "[DONE]" {
			continue
		}
		var a answer
		if err := json.Unmarshal([]byte(data), &a); err != nil {
			t.Fatalf("chunk %s: %v", data, err)
		}
		for _, c := range a.Choices {
			if c.FinishReason != nil {
				if finish != "" {
					t.Fatalf("two finish reasons in %s", raw)
				}
				finish = *c.FinishReason
			}
		}
		if a.Usage != nil {
			tokens = a.Usage["completion_tokens"]
		}
	}
	return finish, tokens
}

// TestNoRouteErrors: an unknown path is a 404 and a known path with the
// wrong method a 405 (with Allow), both as OpenAI-shaped JSON errors.
func TestNoRouteErrors(t *testing.T) {
	srv := start(t, Config{TimeScale: 0.01})
	for _, tc := range []struct {
		method, path string
		status       int
		allow        string
	}{
		{"GET", "/v1/nothing", 404, ""},
		{"GET", "/v1/chat/completions", 405, "POST"},
		{"POST", "/v1/models", 405, "GET"},
	} {
		req, _ := http.NewRequest(tc.method, srv.URL+tc.path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var v struct {
			Error struct{ Message, Type, Code string }
		}
		err = json.NewDecoder(resp.Body).Decode(&v)
		resp.Body.Close()
		if resp.StatusCode != tc.status || err != nil || v.Error.Message == "" || v.Error.Type == "" ||
			resp.Header.Get("content-type") != "application/json" || resp.Header.Get("allow") != tc.allow {
			t.Errorf("%s %s: status %d, allow %q, error %+v (%v)", tc.method, tc.path, resp.StatusCode, resp.Header.Get("allow"), v, err)
		}
	}
}

// TestAPIErrors: the Messages API answers a bad request in Anthropic's
// error shape, the others in OpenAI's.
func TestAPIErrors(t *testing.T) {
	srv := start(t, Config{TimeScale: 0.01})
	for _, tc := range []struct {
		path, body string
		anthropic  bool
	}{
		{"/v1/messages", `{"model":"m","messages":[{"role":"user","content":"hi"}]}`, true}, // no max_tokens
		{"/v1/messages", `{`, true},
		{"/v1/responses", `{"model":"m"}`, false},
		{"/v1/embeddings", `{"input":""}`, false},
	} {
		resp, err := http.Post(srv.URL+tc.path, "application/json", strings.NewReader(tc.body))
		if err != nil {
			t.Fatal(err)
		}
		var v struct {
			Type  string
			Error struct{ Type, Message string }
		}
		err = json.NewDecoder(resp.Body).Decode(&v)
		resp.Body.Close()
		if resp.StatusCode != 400 || err != nil || v.Error.Message == "" || (v.Type == "error") != tc.anthropic {
			t.Errorf("%s %s: status %d, %+v (%v)", tc.path, tc.body, resp.StatusCode, v, err)
		}
	}
}

// TestOwnLength: OutputHeader sets an answer's own length, which max_tokens
// still cuts, and which IgnoreEOS ignores when max_tokens is set.
func TestOwnLength(t *testing.T) {
	eos, ignoreEOS := start(t, Config{TimeScale: 0.001}), start(t, Config{TimeScale: 0.001, IgnoreEOS: true})
	for _, tc := range []struct {
		srv                  *httptest.Server
		maxTokens, own, want int
		finish               string
	}{{eos, 0, 17, 17, "stop"}, {eos, 5, 17, 5, "length"}, {eos, 40, 17, 17, "stop"},
		{ignoreEOS, 0, 17, 17, "stop"}, {ignoreEOS, 40, 17, 40, "length"}} {
		srv := tc.srv
		req := map[string]any{"model": "m", "messages": []map[string]string{{"role": "user", "content": words(10, 2)}}}
		if tc.maxTokens > 0 {
			req["max_tokens"] = tc.maxTokens
		}
		b, _ := json.Marshal(req)
		hr, _ := http.NewRequest("POST", srv.URL+"/v1/chat/completions", bytes.NewReader(b))
		hr.Header.Set(OutputHeader, strconv.Itoa(tc.own))
		resp, err := http.DefaultClient.Do(hr)
		if err != nil {
			t.Fatal(err)
		}
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		finish, n := finishOf(t, raw, false)
		if finish != tc.finish || n != tc.want {
			t.Errorf("max_tokens %d, own %d: %d tokens, %s; want %d, %s", tc.maxTokens, tc.own, n, finish, tc.want, tc.finish)
		}
	}
}

// TestChoices: n choices for each prompt of a list, each with its index,
// whole and streamed; usage counts every prompt once and every choice's
// tokens.
func TestChoices(t *testing.T) {
	srv := start(t, Config{TimeScale: 0.001})
	for _, tc := range []struct {
		name, path, body string
		choices          int
		promptTokens     int
	}{
		{"n on chat", "/v1/chat/completions", `{"messages":[{"role":"user","content":"` + words(10, 1) + `"}],"n":3,"max_tokens":4}`, 3, 19},
		{"list of prompts", "/v1/completions", `{"prompt":["` + words(5, 1) + `","` + words(7, 2) + `"],"max_tokens":4}`, 2, 12},
		{"list of prompts, n 2", "/v1/completions", `{"prompt":["` + words(5, 1) + `","` + words(7, 2) + `"],"n":2,"max_tokens":4}`, 4, 12},
		{"token ids", "/v1/completions", `{"prompt":[[1,2,3],[4,5]],"max_tokens":4}`, 2, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, streamed := range []bool{false, true} {
				body := strings.TrimSuffix(tc.body, "}") + fmt.Sprintf(`,"stream":%v,"stream_options":{"include_usage":true}}`, streamed)
				resp, err := http.Post(srv.URL+tc.path, "application/json", strings.NewReader(body))
				if err != nil {
					t.Fatal(err)
				}
				raw, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				type answer struct {
					Choices []struct {
						Index        int     `json:"index"`
						FinishReason *string `json:"finish_reason"`
					}
					Usage map[string]int
				}
				finished := map[int]int{}
				var usage map[string]int
				chunks := []string{string(raw)}
				if streamed {
					chunks = nil
					for _, line := range strings.Split(string(raw), "\n") {
						if d, ok := strings.CutPrefix(line, "data: "); ok && d != "[DONE]" {
							chunks = append(chunks, d)
						}
					}
				}
				for _, c := range chunks {
					var a answer
					if err := json.Unmarshal([]byte(c), &a); err != nil {
						t.Fatalf("%s: %v", c, err)
					}
					for _, ch := range a.Choices {
						if ch.FinishReason != nil {
							finished[ch.Index]++
						}
					}
					if a.Usage != nil {
						usage = a.Usage
					}
				}
				if len(finished) != tc.choices {
					t.Fatalf("streamed %v: choices finished %v, want indices 0..%d once each", streamed, finished, tc.choices-1)
				}
				for i := range tc.choices {
					if finished[i] != 1 {
						t.Fatalf("streamed %v: choice %d finished %d times", streamed, i, finished[i])
					}
				}
				if usage["prompt_tokens"] != tc.promptTokens || usage["completion_tokens"] != 4*tc.choices {
					t.Fatalf("streamed %v: usage %v, want %d prompt and %d completion tokens", streamed, usage, tc.promptTokens, 4*tc.choices)
				}
			}
		})
	}
}

// TestResponsesStreamAndBase64: the Responses API's stream sends its event
// types in the order the SDKs' stream helpers need; embeddings come as
// base64 float32s when asked, as OpenAI's API sends them.
func TestResponsesStreamAndBase64(t *testing.T) {
	srv := start(t, Config{TimeScale: 0.001})
	resp, err := http.Post(srv.URL+"/v1/responses", "application/json", strings.NewReader(`{"input":"hi there","stream":true,"max_output_tokens":2}`))
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var types []string
	for _, line := range strings.Split(string(raw), "\n") {
		if d, ok := strings.CutPrefix(line, "data: "); ok {
			var ev struct{ Type string }
			json.Unmarshal([]byte(d), &ev)
			types = append(types, ev.Type)
		}
	}
	want := []string{"response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
		"response.output_text.delta", "response.output_text.delta", "response.output_text.done", "response.content_part.done",
		"response.output_item.done", "response.incomplete"}
	if strings.Join(types, " ") != strings.Join(want, " ") {
		t.Fatalf("events %v, want %v", types, want)
	}

	resp, err = http.Post(srv.URL+"/v1/embeddings", "application/json", strings.NewReader(`{"input":"one two","encoding_format":"base64"}`))
	if err != nil {
		t.Fatal(err)
	}
	var e struct {
		Data []struct{ Embedding string }
	}
	err = json.NewDecoder(resp.Body).Decode(&e)
	resp.Body.Close()
	if err != nil || len(e.Data) != 1 {
		t.Fatalf("embeddings: %+v, %v", e, err)
	}
	if b, err := base64.StdEncoding.DecodeString(e.Data[0].Embedding); err != nil || len(b) != 8*4 {
		t.Fatalf("base64 embedding %q: %d bytes, %v; want 8 float32s", e.Data[0].Embedding, len(b), err)
	}
}
