// Package sim is llmsim, a small OpenAI-compatible backend that behaves
// enough like one vLLM instance for tokenlb's demo and tests: prompts are
// prefilled one at a time (compute-bound, so a long prompt delays every
// request queued behind it), then output tokens stream at a fixed pace.
//
// It counts tokens its own way (one per 4 bytes of prompt text), not with
// tokenlb's tokenizer, as a real model's tokenizer differs from tiktoken.
//
// Defaults resemble an 8B model on one modern GPU: 10,000 prefill tokens/s
// and 20 ms per output token.
package sim

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Config configures a Server. Zero fields take the defaults.
type Config struct {
	// PrefillTokensPerSec is the prompt processing rate.
	PrefillTokensPerSec float64
	// TokenDelay is the time per output token.
	TokenDelay time.Duration
	// DefaultMaxTokens is the output length when a request sets none.
	DefaultMaxTokens int
	// TimeScale multiplies every duration (0.1 runs ten times faster).
	TimeScale float64
	// Model is the name /v1/models reports.
	Model string
}

// Server is one simulated backend. It is an http.Handler.
type Server struct {
	cfg     Config
	prefill sync.Mutex // one prompt at a time
	running atomic.Int64
	served  atomic.Int64
	mux     *http.ServeMux
}

// New returns a Server.
func New(cfg Config) *Server {
	if cfg.PrefillTokensPerSec <= 0 {
		cfg.PrefillTokensPerSec = 10000
	}
	if cfg.TokenDelay <= 0 {
		cfg.TokenDelay = 20 * time.Millisecond
	}
	if cfg.DefaultMaxTokens <= 0 {
		cfg.DefaultMaxTokens = 64
	}
	if cfg.TimeScale <= 0 {
		cfg.TimeScale = 1
	}
	if cfg.Model == "" {
		cfg.Model = "llmsim"
	}
	s := &Server{cfg: cfg, mux: http.NewServeMux()}
	s.mux.HandleFunc("POST /v1/chat/completions", s.complete)
	s.mux.HandleFunc("POST /v1/completions", s.complete)
	s.mux.HandleFunc("GET /v1/models", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, map[string]any{"object": "list", "data": []any{map[string]any{"id": cfg.Model, "object": "model"}}})
	})
	s.mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) {})
	return s
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.mux.ServeHTTP(w, r) }

// Running returns the requests in progress.
func (s *Server) Running() int64 { return s.running.Load() }

type request struct {
	Model     string          `json:"model"`
	Stream    bool            `json:"stream"`
	MaxTokens int             `json:"max_tokens"`
	Messages  json.RawMessage `json:"messages"`
	Prompt    json.RawMessage `json:"prompt"`
}

// PromptTokens is llmsim's own token count: one token per 4 bytes of the
// prompt's JSON text, at least one.
func PromptTokens(messages, prompt []byte) int {
	return max(1, (len(messages)+len(prompt)+3)/4)
}

func (s *Server) scaled(d time.Duration) time.Duration {
	return time.Duration(float64(d) * s.cfg.TimeScale)
}

func (s *Server) complete(w http.ResponseWriter, r *http.Request) {
	var req request
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		w.Header().Set("content-type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		fmt.Fprintf(w, `{"error":{"message":%q,"type":"invalid_request_error","code":"invalid_json"}}`, err.Error())
		return
	}
	s.running.Add(1)
	defer s.running.Add(-1)
	prompt := PromptTokens(req.Messages, req.Prompt)
	out := req.MaxTokens
	if out <= 0 {
		out = s.cfg.DefaultMaxTokens
	}
	ctx := r.Context()
	sleep := func(d time.Duration) bool {
		t := time.NewTimer(s.scaled(d))
		defer t.Stop()
		select {
		case <-t.C:
			return true
		case <-ctx.Done():
			return false
		}
	}
	s.prefill.Lock()
	ok := sleep(time.Duration(float64(prompt) / s.cfg.PrefillTokensPerSec * float64(time.Second)))
	s.prefill.Unlock()
	if !ok {
		return
	}
	usage := map[string]int{"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}
	id := fmt.Sprintf("cmpl-%d", s.served.Add(1))
	if !req.Stream {
		if !sleep(time.Duration(out) * s.cfg.TokenDelay) {
			return
		}
		writeJSON(w, map[string]any{"id": id, "object": "chat.completion", "model": s.cfg.Model,
			"choices": []any{map[string]any{"index": 0, "finish_reason": "length",
				"message": map[string]string{"role": "assistant", "content": strings.Repeat("tok ", out)}}},
			"usage": usage})
		return
	}
	w.Header().Set("content-type", "text/event-stream")
	fl, _ := w.(http.Flusher)
	for i := range out {
		if i > 0 && !sleep(s.cfg.TokenDelay) {
			return
		}
		b, _ := json.Marshal(map[string]any{"id": id, "object": "chat.completion.chunk", "model": s.cfg.Model,
			"choices": []any{map[string]any{"index": 0, "delta": map[string]string{"content": "tok "}}}})
		fmt.Fprintf(w, "data: %s\n\n", b)
		if fl != nil {
			fl.Flush()
		}
	}
	b, _ := json.Marshal(map[string]any{"id": id, "object": "chat.completion.chunk", "model": s.cfg.Model,
		"choices": []any{map[string]any{"index": 0, "delta": map[string]string{}, "finish_reason": "length"}}, "usage": usage})
	fmt.Fprintf(w, "data: %s\n\ndata: [DONE]\n\n", b)
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("content-type", "application/json")
	json.NewEncoder(w).Encode(v)
}
