package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"time"

	"github.com/tokenlb/tokenlb/internal/proc"
)

// peakPrefillChunk is the prompt of llm-d's calibration recipe: vLLM's
// --max-num-batched-tokens on a GPU (8,192), which is also llmsim's step
// budget.
const peakPrefillChunk = 8192

// PeakPrefillThroughput measures o's backends the way llm-d's calibration
// recipe (guides/recipes/router/calibration in github.com/llm-d/llm-d) does,
// for its endpoint picker's peakPrefillThroughput: 5 warm-up and then 20
// streamed completions, one at a time, each of a fresh prompt of
// peakPrefillChunk tokens (so that no prefix cache helps) and 1 output
// token; the result is the prompt's tokens over the median time to first
// token. The requests go straight to backend-1, which is idle between them
// as a fleet behind a router would be.
func PeakPrefillThroughput(ctx context.Context, o Options) (float64, error) {
	dir, err := os.MkdirTemp("", "tokenlb-calibrate")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	g := &proc.Group{Dir: dir}
	defer g.StopAll()
	o.Backends = 1
	b, err := startBackends(ctx, g, o)
	if err != nil {
		return 0, err
	}
	defer b.stop()
	rng := rand.New(rand.NewPCG(o.Seed, 0xca1b))
	var ttfts []float64
	for i := range 25 {
		ttft, err := firstToken(ctx, "http://"+b.hosts[0]+"/v1/completions", Text(rng, peakPrefillChunk))
		if err != nil {
			return 0, fmt.Errorf("bench: calibration request %d: %w", i+1, err)
		}
		if i >= 5 {
			ttfts = append(ttfts, ttft.Seconds())
		}
	}
	slices.Sort(ttfts)
	return peakPrefillChunk / ttfts[len(ttfts)/2], nil
}

// firstToken sends one streamed completion of prompt with 1 output token
// and returns its time to first token.
func firstToken(ctx context.Context, url, prompt string) (time.Duration, error) {
	body, _ := json.Marshal(map[string]any{"model": "llmsim", "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": true})
	req, err := http.NewRequestWithContext(ctx, "POST", url, bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	req.Header.Set("content-type", "application/json")
	s := sendRequest(http.DefaultClient, req)
	if s.err != nil {
		return 0, s.err
	}
	if s.ttft <= 0 {
		return 0, fmt.Errorf("no token came back")
	}
	return s.ttft, nil
}
