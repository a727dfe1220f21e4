package sim

import (
	"bufio"
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func chat(contentBytes int, stream bool, maxTokens int) []byte {
	b, _ := json.Marshal(map[string]any{"stream": stream, "max_tokens": maxTokens,
		"messages": []map[string]string{{"role": "user", "content": strings.Repeat("a", contentBytes)}}})
	return b
}

// ttft sends a streaming request and returns the time to its first event.
func ttft(t *testing.T, url string, body []byte) time.Duration {
	t.Helper()
	start := time.Now()
	resp, err := http.Post(url+"/v1/chat/completions", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	r := bufio.NewReader(resp.Body)
	if line, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(line, "data: {") {
		t.Fatalf("first line %q, %v", line, err)
	}
	d := time.Since(start)
	var last string
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			break
		}
		if strings.HasPrefix(line, "data: ") {
			last = line
		}
	}
	if last != "data: [DONE]\n" {
		t.Fatalf("stream ended with %q", last)
	}
	return d
}

func TestLongPromptHasLongerTTFT(t *testing.T) {
	// 1,000 prefill tokens/s: a 40,000-byte prompt (10,000 tokens) takes
	// 10 s of prefill, scaled by 0.02 to 200 ms; a 40-byte one 0.2 ms.
	srv := httptest.NewServer(New(Config{PrefillTokensPerSec: 1000, TokenDelay: time.Millisecond, TimeScale: 0.02}))
	defer srv.Close()
	short := ttft(t, srv.URL, chat(40, true, 2))
	long := ttft(t, srv.URL, chat(40000, true, 2))
	if long < 180*time.Millisecond || long < short+150*time.Millisecond {
		t.Fatalf("TTFT long %v, short %v: want the long prompt's prefill (200 ms) on top", long, short)
	}
}

func TestUsageAndModels(t *testing.T) {
	srv := httptest.NewServer(New(Config{TimeScale: 0.01}))
	defer srv.Close()
	resp, err := http.Post(srv.URL+"/v1/chat/completions", "application/json", bytes.NewReader(chat(100, false, 5)))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var v struct {
		Usage struct {
			PromptTokens     int `json:"prompt_tokens"`
			CompletionTokens int `json:"completion_tokens"`
		} `json:"usage"`
	}
	json.NewDecoder(resp.Body).Decode(&v)
	// The messages JSON is [{"role":"user","content":"a…a"}]: 131 bytes, 33 tokens.
	if v.Usage.PromptTokens != 33 || v.Usage.CompletionTokens != 5 {
		t.Fatalf("usage %+v", v.Usage)
	}
	r, err := http.Get(srv.URL + "/v1/models")
	if err != nil || r.StatusCode != 200 {
		t.Fatalf("/v1/models %v %v", r, err)
	}
	r.Body.Close()
}
