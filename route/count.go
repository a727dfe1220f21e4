package route

import (
	"time"

	"github.com/tokenlb/tokenlb/llmapi"
	"github.com/tokenlb/tokenlb/prefix"
	"github.com/tokenlb/tokenlb/processor"
	"github.com/tokenlb/tokenlb/tokenizer"
)

// prompt is what counting a request body found.
type prompt struct {
	llmapi.Prompt
	// Estimated is "" when Tokens is exact, else why part of it was
	// estimated (tokenizer.EstimatedSize or EstimatedTime).
	Estimated string
	// Prefix hashes the prompt's leading blocks (Config.Prefix), each
	// covering every block before it; BlockBytes is their length and
	// TextBytes the length of all the request's texts: what share of the
	// prompt a shared prefix covers.
	Prefix     []uint64
	BlockBytes int
	TextBytes  int
}

// count parses the body and counts its prompt. A request without a body
// costs nothing, except that a POST to an API path needs a prompt (400);
// GET and DELETE there are routed.
func (rt *Router) count(r *processor.Request) (prompt, *processor.Rejection) {
	api := llmapi.APIFor(r.Path)
	if !r.HasBody {
		if api != llmapi.Other && r.Method == "POST" {
			return prompt{}, errPrompt(llmapi.ErrNoPrompt)
		}
		return prompt{Prompt: llmapi.Prompt{API: api}}, nil
	}
	start := time.Now()
	p, err := rt.countBody(r.Path, r.Body)
	rt.m.tokenizeSeconds.Observe(time.Since(start).Seconds())
	if err != nil {
		return p, errPrompt(err)
	}
	return p, nil
}

// countBody walks the body as its API's request shape and counts each text
// within the tokenizer's budget, hashing the prompt's leading blocks in the
// same pass.
func (rt *Router) countBody(path string, body []byte) (prompt, error) {
	c := &counter{budget: rt.cfg.Tokenizer.Budget(), hasher: prefix.NewHasher(rt.cfg.Prefix)}
	p, err := llmapi.Parse(path, body, c)
	c.budget.Done()
	out := prompt{Prompt: p, Estimated: c.budget.Estimated(), Prefix: c.hasher.Sum(), TextBytes: c.bytes}
	if out.Prefix != nil {
		out.BlockBytes = c.hasher.BlockBytes()
	}
	return out, err
}

// counter counts one request's texts for llmapi.Parse: it notes their
// length, hashes them for prefix affinity and counts them within the
// budget.
type counter struct {
	budget *tokenizer.Budget
	hasher *prefix.Hasher
	bytes  int // of every text, counted exactly or not
}

func (c *counter) Count(s string) int {
	if s == "" {
		return 0
	}
	c.bytes += len(s)
	c.hasher.Write(s)
	return c.budget.Count(s)
}
