// Package bench compares tokenlb with Envoy's own load balancers through a
// real Envoy in front of the same llmsim backends, on seeded, reproducible
// workloads.
package bench

import (
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
)

// Request is one request of a workload.
type Request struct {
	Messages  []Message
	MaxTokens int
	// Model is the request's model, "" for llmsim's own; OutputTokens,
	// when set, is the answer's own length, which llmsim is told in a
	// header tokenlb does not read (llmsim.OutputHeader): what an
	// open-ended request (no MaxTokens) turns out to need.
	Model        string
	OutputTokens int
}

// outputs is the request's output length: its own when set, else
// MaxTokens.
func (r Request) outputs() int {
	if r.OutputTokens > 0 {
		return r.OutputTokens
	}
	return r.MaxTokens
}

// Message is one chat message.
type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// Profiles lists the workload profiles.
var Profiles = []string{"seed", "heavy", "chat", "prefix", "open"}

// ShortModel is the model name of the open profile's short answers: llmsim
// serves it besides its own (backendConfig), so that a cost model that
// learns output lengths per model can tell the two kinds of request apart.
const ShortModel = "llmsim-short"

// vocabulary: common English words that are one token in both tiktoken
// (with a leading space) and llmsim (≤ 4 bytes), so a prompt of n words is
// about n tokens to both.
var vocabulary = strings.Fields(`time work life hand part case week home fact
area room game book word side kind head team girl line name city body face
door food tree land wind fire rain road ship king hope mind idea plan rule
love help view test data form note list file code unit rate cost risk goal`)

// Text returns words random words of the vocabulary: text that costs about
// as many tokens to tiktoken and to llmsim, and shares no long prefix with
// other such text, so that backends' prefix caches do not make prefills free.
func Text(rng *rand.Rand, words int) string {
	var b strings.Builder
	for i := range words {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(vocabulary[rng.IntN(len(vocabulary))])
	}
	return b.String()
}

// prefixDocs is how many documents the prefix profile asks about.
const prefixDocs = 24

// jitter returns n ±20%.
func jitter(rng *rand.Rand, n int) int { return max(1, int(float64(n)*(0.8+0.4*rng.Float64()))) }

func lognormal(rng *rand.Rand, median, sigma float64, lo, hi int) int {
	return min(hi, max(lo, int(median*math.Exp(sigma*rng.NormFloat64()))))
}

// Generate returns n requests of profile, the same for the same seed:
//
//	seed    50% ~30 tokens, 25% ~2,750, 25% ~7,500 (±20%), the original experiment's mix
//	heavy   20% / 40% / 40% of the same sizes
//	chat    log-normal prompts and outputs, one of 4 shared system prompts, 0-3 earlier turns
//	prefix  one of 24 long documents (~3,000 tokens) then a short question:
//	        40% ask about the first document, the rest about any of them
//
//	open    no max_tokens: 60% chat answers of a heavy-tailed length
//	        (log-normal, median 250, σ 1, up to 4,000), 40% short
//	        classifications (model llmsim-short: median 8, σ 0.5, up to
//	        64), prompts log-normal (median 400 and 800 tokens)
//
// seed and heavy ask for 32-96 output tokens, prefix for 64.
func Generate(profile string, seed uint64, n int) ([]Request, error) {
	rng := rand.New(rand.NewPCG(seed, 0x70c3))
	// Shared content drawn first, from its own stream, so it is the same
	// whatever n is.
	shared := rand.New(rand.NewPCG(seed, 0x5a3e))
	var systems, docs []string
	for range 4 {
		systems = append(systems, Text(shared, 400))
	}
	// 24 documents of 3,000 tokens are 72,000 tokens: more than one
	// backend's prefix cache holds (llmsim's 65,536, shared with the
	// running requests), less than three do.
	for range prefixDocs {
		docs = append(docs, Text(shared, 3000))
	}
	out := make([]Request, 0, n)
	for range n {
		var r Request
		switch profile {
		case "seed", "heavy":
			small := 0.5
			if profile == "heavy" {
				small = 0.2
			}
			size := 7500
			switch u := rng.Float64(); {
			case u < small:
				size = 30
			case u < small+(1-small)/2:
				size = 2750
			}
			r = Request{Messages: []Message{{"user", Text(rng, jitter(rng, size))}}, MaxTokens: 32 + rng.IntN(65)}
		case "chat":
			r.Messages = []Message{{"system", systems[rng.IntN(len(systems))]}}
			for range rng.IntN(4) {
				r.Messages = append(r.Messages, Message{"user", Text(rng, lognormal(rng, 150, 1, 5, 3000))},
					Message{"assistant", Text(rng, lognormal(rng, 150, 0.8, 5, 1500))})
			}
			r.Messages = append(r.Messages, Message{"user", Text(rng, lognormal(rng, 200, 1.2, 5, 6000))})
			r.MaxTokens = lognormal(rng, 150, 0.8, 8, 1000)
		case "prefix":
			// One document is asked about far more than the others: the
			// popular system prompt that must not pile onto one host.
			d := 0
			if rng.Float64() >= 0.4 {
				d = rng.IntN(len(docs))
			}
			r = Request{Messages: []Message{{"user", docs[d] + "\n\nquestion: " + Text(rng, 30)}}, MaxTokens: 64}
		case "open":
			// Open-ended: the client sets no limit and the answer's
			// length is the model's own, unknown until it ends.
			if rng.Float64() < 0.6 {
				r = Request{Messages: []Message{{"user", Text(rng, lognormal(rng, 400, 1, 10, 6000))}},
					OutputTokens: lognormal(rng, 250, 1, 1, 4000)}
			} else {
				r = Request{Model: ShortModel, Messages: []Message{{"user", Text(rng, lognormal(rng, 800, 0.8, 10, 6000))}},
					OutputTokens: lognormal(rng, 8, 0.5, 1, 64)}
			}
		default:
			return nil, fmt.Errorf("bench: unknown profile %q (want one of %v)", profile, Profiles)
		}
		out = append(out, r)
	}
	return out, nil
}
