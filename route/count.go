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
	// Prefix hashes the prompt's leading blocks (Config.Prefix), each
	// covering every block before it; BlockBytes is their length and
	// TextBytes the length of all the request's texts: what share of the
	// prompt a shared prefix covers.
	Prefix     []uint64
	BlockBytes int
	TextBytes  int
	// Estimated says why part of the prompt was estimated rather than
	// counted (tokenizer.EstimatedSize, EstimatedTime); "" when it was all
	// counted.
	Estimated string
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
	pass := &onePass{budget: rt.cfg.Tokenizer.Budget(), hasher: prefix.NewHasher(rt.cfg.Prefix)}
	p, err := llmapi.Parse(path, body, pass)
	pass.budget.Done()
	out := prompt{Prompt: p, Prefix: pass.hasher.Sum(), TextBytes: pass.bytes, Estimated: pass.budget.Estimated()}
	if out.Prefix != nil {
		out.BlockBytes = pass.hasher.BlockBytes()
	}
	return out, err
}

// onePass is the llmapi.Counter that reads each text of a request once: it
// notes its length, hashes it for prefix affinity and counts its tokens
// within the budget.
type onePass struct {
	budget *tokenizer.Budget
	hasher prefix.Hasher
	bytes  int // of every text, counted exactly or not
}

func (o *onePass) Count(s string) int {
	o.bytes += len(s)
	o.hasher.Write(s)
	return o.budget.Count(s)
}
