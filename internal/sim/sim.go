// Package sim is llmsim, an OpenAI-compatible server that behaves like one
// vLLM instance, for tokenlb's demo, tests and benchmarks.
//
// # Model
//
// A continuous-batching engine (see engine.go) runs up to MaxNumSeqs
// sequences; the rest wait in FIFO order. Each step spends a budget of
// MaxNumBatchedTokens: one token for each decoding sequence, the rest on
// prefill chunks (chunked prefill), and lasts
//
//	StepOverhead + PrefillTokenCost × prefill tokens + DecodeSeqCost × decoding sequences.
//
// A long prompt therefore delays the first token of every request prefilled
// behind it and slows the decoding of every request batched with it, which
// is what a load balancer has to avoid. KV memory is KVBlocks blocks of
// BlockSize tokens with prefix caching: a prompt that starts with blocks seen
// before skips their prefill. Each answer's own length is a log-normal draw
// (median OutputMedian, σ OutputSigma) from a seeded generator; it ends
// there with finish_reason "stop", or at max_tokens with "length" when that
// comes first. With IgnoreEOS (vLLM's ignore_eos, as benchmarks set it) an
// answer is max_tokens long whenever the request sets it.
//
// The defaults resemble an 8B model in bf16 on one H100-class GPU: about
// 20,000 prefill tokens/s (50 µs a token), 4 ms step overhead and 0.1 ms per
// decoding sequence (about 140 output tokens/s for one request, 75 at a batch
// of 64), 256 sequences, an 8,192-token step budget and 65,536 tokens of KV
// cache. TimeScale multiplies every duration, so tests and quick benchmarks
// run the same model faster; instances can be made slower or faster than
// others with the costs.
//
// # Tokens
//
// llmsim has its own tokenizer, not tokenlb's, as a real model's tokenizer
// differs from tiktoken: every whitespace-separated word is one token per 4
// bytes (rounded up), and a chat message adds 4 template tokens. usage
// reports these counts.
//
// # APIs
//
// POST /v1/chat/completions and /v1/completions (whole or streamed, with
// stream_options.include_usage), /v1/embeddings, /v1/responses (OpenAI's
// Responses API, whole or as its typed events) and /v1/messages
// (Anthropic's, whole or streamed, its errors in Anthropic's shape); GET
// /v1/models, /health and /metrics (vLLM's metric names). Every other path
// or method gets a JSON 404 or 405, as vLLM answers. Completions take n
// (up to 16) and lists of prompts (strings or token ids): a choice for each,
// each a sequence of its own on the engine. Tools and sampling parameters
// are accepted and ignored.
package sim

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Config configures a Server. Zero fields take the defaults in Defaults.
type Config struct {
	Name                string // instance name, sent in the x-llmsim-instance response header
	Model               string
	MaxNumSeqs          int
	MaxNumBatchedTokens int
	KVBlocks            int
	BlockSize           int
	StepOverhead        time.Duration
	PrefillTokenCost    time.Duration
	DecodeSeqCost       time.Duration
	OutputMedian        int
	OutputSigma         float64
	// Aliases are more model names the server answers to and lists.
	Aliases   []string
	IgnoreEOS bool
	TimeScale float64
	Seed      uint64
}

// Defaults is the configuration zero fields take.
var Defaults = Config{
	Model:               "llmsim",
	MaxNumSeqs:          256,
	MaxNumBatchedTokens: 8192,
	KVBlocks:            4096,
	BlockSize:           16,
	StepOverhead:        4 * time.Millisecond,
	PrefillTokenCost:    50 * time.Microsecond,
	DecodeSeqCost:       100 * time.Microsecond,
	OutputMedian:        200,
	OutputSigma:         0.6,
	TimeScale:           1,
	Seed:                1,
}

func (c Config) withDefaults() Config {
	d := Defaults
	set := func(v *int, def int) {
		if *v <= 0 {
			*v = def
		}
	}
	set(&c.MaxNumSeqs, d.MaxNumSeqs)
	set(&c.MaxNumBatchedTokens, d.MaxNumBatchedTokens)
	set(&c.KVBlocks, d.KVBlocks)
	set(&c.BlockSize, d.BlockSize)
	set(&c.OutputMedian, d.OutputMedian)
	if c.Model == "" {
		c.Model = d.Model
	}
	if c.StepOverhead <= 0 {
		c.StepOverhead = d.StepOverhead
	}
	if c.PrefillTokenCost <= 0 {
		c.PrefillTokenCost = d.PrefillTokenCost
	}
	if c.DecodeSeqCost <= 0 {
		c.DecodeSeqCost = d.DecodeSeqCost
	}
	if c.TimeScale <= 0 {
		c.TimeScale = d.TimeScale
	}
	if c.OutputSigma <= 0 {
		c.OutputSigma = d.OutputSigma
	}
	if c.Seed == 0 {
		c.Seed = d.Seed
	}
	return c
}

// Server is one simulated vLLM instance. It is an http.Handler; Run runs
// its engine.
type Server struct {
	cfg Config
	eng *engine
	m   *metrics
	mux *http.ServeMux
}

// New returns a Server; call Run to start its engine.
func New(cfg Config) *Server {
	cfg = cfg.withDefaults()
	m := newMetrics()
	s := &Server{cfg: cfg, m: m, eng: newEngine(cfg, m), mux: http.NewServeMux()}
	s.mux.HandleFunc("POST /v1/chat/completions", s.complete)
	s.mux.HandleFunc("POST /v1/completions", s.complete)
	s.mux.HandleFunc("POST /v1/embeddings", s.embeddings)
	s.mux.HandleFunc("POST /v1/responses", s.responses)
	s.mux.HandleFunc("POST /v1/messages", s.messages)
	s.mux.HandleFunc("GET /v1/models", func(w http.ResponseWriter, _ *http.Request) {
		data := []any{}
		for _, m := range append([]string{cfg.Model}, cfg.Aliases...) {
			data = append(data, map[string]any{"id": m, "object": "model", "owned_by": "llmsim"})
		}
		writeJSON(w, 200, map[string]any{"object": "list", "data": data})
	})
	s.mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) {})
	s.mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	return s
}

// Run runs the engine until ctx is done.
func (s *Server) Run(ctx context.Context) { s.eng.run(ctx) }

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if s.cfg.Name != "" {
		w.Header().Set("x-llmsim-instance", s.cfg.Name)
	}
	if _, pattern := s.mux.Handler(r); pattern == "" {
		s.noRoute(w, r)
		return
	}
	s.mux.ServeHTTP(w, r)
}

// noRoute answers a request no handler serves as vLLM's OpenAI server
// does, in OpenAI's JSON error shape: 405 with Allow when the path is
// served for another method, else 404.
func (s *Server) noRoute(w http.ResponseWriter, r *http.Request) {
	var allowed []string
	for _, m := range []string{"GET", "POST"} {
		probe := r.Clone(r.Context())
		probe.Method = m
		if _, pattern := s.mux.Handler(probe); pattern != "" {
			allowed = append(allowed, m)
		}
	}
	if len(allowed) > 0 {
		w.Header().Set("allow", strings.Join(allowed, ", "))
		apiError(w, 405, "method_not_allowed", fmt.Sprintf("%s is not allowed on %s", r.Method, r.URL.Path))
		return
	}
	apiError(w, 404, "not_found", fmt.Sprintf("no route for %s %s", r.Method, r.URL.Path))
}

// OutputHeader, on a request, sets the length its answer would have of its
// own (instead of a draw): a benchmark's knob for open-ended requests, which
// a load balancer does not read. max_tokens still cuts it.
const OutputHeader = "x-llmsim-output-tokens"

// ownLength is the request's OutputHeader, or 0.
func ownLength(r *http.Request) int {
	n, _ := strconv.Atoi(r.Header.Get(OutputHeader))
	return max(n, 0)
}

// Tokenize is llmsim's tokenizer: each whitespace-separated word is one
// token per 4 bytes, rounded up; a token's id hashes the word and position
// in the word, so equal texts give equal ids.
func Tokenize(text string) []uint32 {
	var out []uint32
	for _, w := range strings.Fields(text) {
		h := fnv.New32a()
		h.Write([]byte(w))
		base := h.Sum32()
		for i := 0; i < len(w); i += 4 {
			out = append(out, base+uint32(i))
		}
	}
	return out
}

type request struct {
	Model         string          `json:"model"`
	Stream        bool            `json:"stream"`
	MaxTokens     int             `json:"max_tokens"`
	MaxCompletion int             `json:"max_completion_tokens"`
	Messages      json.RawMessage `json:"messages"`
	Prompt        json.RawMessage `json:"prompt"`
	N             int             `json:"n"`
	StreamOptions struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
}

// promptTokens renders a request's prompt as a chat template would and
// tokenizes it.
func promptTokens(r *request) ([]uint32, error) {
	if len(r.Messages) > 0 {
		var msgs []struct {
			Role    string          `json:"role"`
			Content json.RawMessage `json:"content"`
		}
		if err := json.Unmarshal(r.Messages, &msgs); err != nil {
			return nil, fmt.Errorf("messages: %w", err)
		}
		var toks []uint32
		for _, m := range msgs {
			toks = append(toks, Tokenize("<|start|> "+m.Role+" <|content|>")...)
			var text string
			if json.Unmarshal(m.Content, &text) != nil {
				text = string(m.Content) // content parts: their JSON
			}
			toks = append(toks, Tokenize(text)...)
			toks = append(toks, Tokenize("<|end|>")...)
		}
		return toks, nil
	}
	var text string
	if json.Unmarshal(r.Prompt, &text) != nil {
		text = string(r.Prompt)
	}
	return Tokenize(text), nil
}

// prompts returns the request's prompts, tokenized: a chat request's one,
// or a completion request's list (of strings, or of token id lists, whose
// ids are its tokens); a single string or token list is one prompt.
func prompts(r *request) ([][]uint32, error) {
	if len(r.Messages) == 0 {
		var texts []string
		if json.Unmarshal(r.Prompt, &texts) == nil && len(texts) > 0 {
			out := make([][]uint32, len(texts))
			for i, t := range texts {
				out[i] = Tokenize(t)
			}
			return out, nil
		}
		var lists [][]uint32
		if json.Unmarshal(r.Prompt, &lists) == nil && len(lists) > 0 {
			return lists, nil
		}
		var ids []uint32
		if json.Unmarshal(r.Prompt, &ids) == nil && len(ids) > 0 {
			return [][]uint32{ids}, nil
		}
	}
	toks, err := promptTokens(r)
	return [][]uint32{toks}, err
}

// complete answers a chat or text completion request, as one response
// or, when the request asks for it, as a server-sent event stream: n
// choices for each of its prompts, each a sequence of its own on the
// engine (the copies of a prompt share its cached prefix).
func (s *Server) complete(w http.ResponseWriter, r *http.Request) {
	req, ps, ok := readRequest(w, r)
	if !ok {
		return
	}
	c := completion{model: s.cfg.Model, chat: r.URL.Path == "/v1/chat/completions"}
	for _, p := range ps {
		c.promptTokens += len(p)
		for range max(1, req.N) {
			sq, err := s.eng.submit(r.Context(), p, req.maxOutput(), ownLength(r))
			if errors.Is(err, errStopped) {
				apiError(w, 503, "shutting_down", err.Error())
				return
			}
			if err != nil {
				apiError(w, 400, "context_length_exceeded", err.Error())
				return
			}
			c.seqs = append(c.seqs, sq)
		}
	}
	c.id = fmt.Sprintf("cmpl-%p", c.seqs[0])
	if !req.Stream {
		c.respond(w, r)
		return
	}
	c.stream(w, r, req.StreamOptions.IncludeUsage)
}

// readRequest decodes a completion request and tokenizes its prompts. It
// answers a request it cannot use with a 400 itself, and then returns
// ok false.
func readRequest(w http.ResponseWriter, r *http.Request) (req request, ps [][]uint32, ok bool) {
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		apiError(w, 400, "invalid_json", err.Error())
		return req, nil, false
	}
	ps, err := prompts(&req)
	for _, p := range ps {
		if err == nil && len(p) == 0 {
			err = errors.New("empty prompt")
		}
	}
	if err == nil && req.N > 16 {
		err = fmt.Errorf("n is %d, at most 16", req.N)
	}
	if err != nil {
		apiError(w, 400, "invalid_prompt", err.Error())
		return req, nil, false
	}
	return req, ps, true
}

// maxOutput is the request's output limit: max_completion_tokens, else
// max_tokens; 0 or less leaves it to the engine.
func (r *request) maxOutput() int {
	if r.MaxCompletion > 0 {
		return r.MaxCompletion
	}
	return r.MaxTokens
}

// completion builds the response objects of one request, in the shape of
// OpenAI's chat completions or (legacy) completions API; its choices are
// its sequences, in order.
type completion struct {
	id, model    string
	chat         bool
	promptTokens int // every prompt's, once
	seqs         []*seq
}

// objects returns the object type of a whole response and of a stream's
// chunk.
func (c completion) objects() (object, chunk string) {
	if c.chat {
		return "chat.completion", "chat.completion.chunk"
	}
	return "text_completion", "text_completion"
}

// usage is the token usage once n tokens have been generated in all.
func (c completion) usage(n int) map[string]int {
	return map[string]int{"prompt_tokens": c.promptTokens, "completion_tokens": n, "total_tokens": c.promptTokens + n}
}

// choice is choice i of a response (delta false) or of a stream's chunk
// (delta true) with text; finish is its finish_reason, or nil.
func (c completion) choice(i int, text string, finish any, delta bool) map[string]any {
	ch := map[string]any{"index": i, "finish_reason": finish}
	switch {
	case !c.chat:
		ch["text"] = text
	case delta:
		ch["delta"] = map[string]string{"content": text}
	default:
		ch["message"] = map[string]string{"role": "assistant", "content": text}
	}
	return ch
}

// respond waits until every sequence has generated its last token and
// answers with the whole completion, unless the client has gone.
func (c completion) respond(w http.ResponseWriter, r *http.Request) {
	choices := make([]any, len(c.seqs))
	total := 0
	for i, sq := range c.seqs {
		n := 0
		for n = range sq.events {
		}
		total += n
		choices[i] = c.choice(i, strings.Repeat("tok ", n), sq.finish, false)
	}
	if r.Context().Err() != nil {
		return
	}
	object, _ := c.objects()
	writeJSON(w, 200, map[string]any{"id": c.id, "object": object, "created": time.Now().Unix(), "model": c.model,
		"choices": choices, "usage": c.usage(total)})
}

// token is one generated token of choice i, the n-th of its sequence.
type token struct{ i, n int }

// stream answers with a server-sent event for each token a sequence
// generates (its choice's index on it), then, with includeUsage, one with
// the usage, and [DONE], unless the client has gone by then.
func (c completion) stream(w http.ResponseWriter, r *http.Request, includeUsage bool) {
	w.Header().Set("content-type", "text/event-stream")
	w.Header().Set("cache-control", "no-cache")
	fl, _ := w.(http.Flusher)
	// Like vLLM (a Starlette StreamingResponse), the response headers go out
	// as soon as the request is queued, before any token exists.
	w.WriteHeader(http.StatusOK)
	if fl != nil {
		fl.Flush()
	}
	send := func(v any) {
		b, _ := json.Marshal(v)
		fmt.Fprintf(w, "data: %s\n\n", b)
		if fl != nil {
			fl.Flush()
		}
	}
	// Every sequence's tokens into one stream, in the order they come. The
	// engine closes each sequence's events when it ends or is cancelled (the
	// client gone), so these goroutines always end.
	tokens := make(chan token)
	var wg sync.WaitGroup
	for i, sq := range c.seqs {
		wg.Go(func() {
			for n := range sq.events {
				tokens <- token{i, n}
			}
		})
	}
	go func() { wg.Wait(); close(tokens) }()
	_, chunk := c.objects()
	total := 0
	for t := range tokens {
		total++
		sq := c.seqs[t.i]
		finish := any(nil)
		if t.n == sq.maxOut {
			finish = sq.finish
		}
		send(map[string]any{"id": c.id, "object": chunk, "model": c.model, "choices": []any{c.choice(t.i, "tok ", finish, true)}})
	}
	if r.Context().Err() != nil {
		return
	}
	if includeUsage {
		send(map[string]any{"id": c.id, "object": chunk, "model": c.model, "choices": []any{}, "usage": c.usage(total)})
	}
	fmt.Fprint(w, "data: [DONE]\n\n")
}

func apiError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, map[string]any{"error": map[string]any{"message": msg, "type": "invalid_request_error", "code": code}})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("content-type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// metrics uses vLLM's metric names, so dashboards and scrapers written for
// vLLM read llmsim too.
type metrics struct {
	reg                            *prometheus.Registry
	running, waiting, kvUsage      prometheus.Gauge
	promptTokens, generationTokens prometheus.Counter
	prefixQueries, prefixHits      prometheus.Counter
	ttft, e2e                      prometheus.Histogram
}

func newMetrics() *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	g := func(name, help string) prometheus.Gauge {
		v := prometheus.NewGauge(prometheus.GaugeOpts{Name: name, Help: help})
		m.reg.MustRegister(v)
		return v
	}
	c := func(name, help string) prometheus.Counter {
		v := prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help})
		m.reg.MustRegister(v)
		return v
	}
	h := func(name, help string) prometheus.Histogram {
		v := prometheus.NewHistogram(prometheus.HistogramOpts{Name: name, Help: help,
			Buckets: []float64{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80}})
		m.reg.MustRegister(v)
		return v
	}
	m.running = g("vllm:num_requests_running", "Requests in the running batch.")
	m.waiting = g("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
	m.kvUsage = g("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.")
	m.promptTokens = c("vllm:prompt_tokens_total", "Prefill tokens processed.")
	m.generationTokens = c("vllm:generation_tokens_total", "Generation tokens processed.")
	m.prefixQueries = c("vllm:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.")
	m.prefixHits = c("vllm:prefix_cache_hits_total", "Prompt tokens found in the prefix cache.")
	m.ttft = h("vllm:time_to_first_token_seconds", "Time to first token.")
	m.e2e = h("vllm:e2e_request_latency_seconds", "End-to-end request latency.")
	return m
}
