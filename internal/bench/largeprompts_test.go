package bench

import (
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"testing"

	"github.com/tokenlb/tokenlb/tokenizer"
)

func TestParseEstimated(t *testing.T) {
	text := `# HELP tokenlb_tokenizer_estimated_requests_total Requests whose count was partly estimated.
# TYPE tokenlb_tokenizer_estimated_requests_total counter
tokenlb_tokenizer_estimated_requests_total{reason="size"} 3
tokenlb_tokenizer_estimated_requests_total{reason="time"} 1.2e+01
tokenlb_tokenizer_estimated_requests_total_other{reason="time"} 99
tokenlb_tokenizer_cache_hits_total 7
`
	got, err := parseEstimated(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got["size"] != 3 || got["time"] != 12 {
		t.Errorf("parseEstimated = %v, want size 3, time 12", got)
	}
	if _, err := parseEstimated(strings.NewReader(`tokenlb_tokenizer_estimated_requests_total{reason="size"} x`)); err == nil {
		t.Error("a bad value parsed")
	}
}

func TestAddLargePromptBaseline(t *testing.T) {
	row := func(arm, mode string, tokens int, p50, p99 float64) LargePromptRow {
		r := LargePromptRow{Arm: arm, Mode: mode, PromptTokens: tokens}
		r.E2E.P50, r.E2E.P99 = p50, p99
		return r
	}
	rows := []LargePromptRow{row("envoy", "-", 4000, 10, 20), row("envoy", "-", 32000, 30, 50),
		row("tokenlb", "buffered", 4000, 12, 25), row("floor", "duplex", 32000, 31, 49), row("tokenlb", "duplex", 200000, 90, 99)}
	addLargePromptBaseline(rows)
	for i, want := range [][2]float64{{0, 0}, {0, 0}, {2, 5}, {1, -1}, {0, 0}} {
		if rows[i].Added.P50 != want[0] || rows[i].Added.P99 != want[1] {
			t.Errorf("row %d (%s %d): added %v/%v, want %v", i, rows[i].Arm, rows[i].PromptTokens, rows[i].Added.P50, rows[i].Added.P99, want)
		}
	}
}

// Each body is a chat request whose prompt is about as many tokens as
// asked (one vocabulary word a token), and no two prompts are the same.
func TestLargePromptBodies(t *testing.T) {
	bodies := largePromptBodies(4000)
	if len(bodies) != largePromptWarmup+largePromptN {
		t.Fatalf("%d bodies", len(bodies))
	}
	seen := map[string]bool{}
	for _, b := range bodies {
		var req struct {
			Stream    bool      `json:"stream"`
			MaxTokens int       `json:"max_tokens"`
			Messages  []Message `json:"messages"`
		}
		if err := json.Unmarshal(b, &req); err != nil {
			t.Fatal(err)
		}
		if req.Stream || req.MaxTokens != largePromptMax || len(req.Messages) != 1 {
			t.Fatalf("request %+v", req)
		}
		c := req.Messages[0].Content
		if n := len(strings.Fields(c)); n != 4000 {
			t.Errorf("%d words, want 4000", n)
		}
		if seen[c] {
			t.Error("a prompt repeats")
		}
		seen[c] = true
	}
}

func TestLargePromptTable(t *testing.T) {
	var est int64 = 2
	rows := []LargePromptRow{{Arm: "envoy", Mode: "-", PromptTokens: 4000},
		{Arm: "tokenlb", Mode: "duplex", PromptTokens: 4000, Estimated: &est, EstimatedByReason: map[string]int64{"time": 2}}}
	md := largePromptTable(rows)
	for _, want := range []string{"One round only", "| envoy | - | 4000 |", "| tokenlb | duplex | 4000 |", "2 / 60 (time 2)"} {
		if !strings.Contains(md, want) {
			t.Errorf("table lacks %q:\n%s", want, md)
		}
	}
	if largePromptTable(nil) != "" {
		t.Error("no rows, yet a table")
	}
}

// The prompts are about as many tokens as words to tokenlb's tokenizer,
// and the largest stays under its exact-counting size budget.
func TestLargePromptTokens(t *testing.T) {
	tk, err := tokenizer.New(tokenizer.Options{})
	if err != nil {
		t.Fatal(err)
	}
	text := Text(rngFor(1), 4000)
	if n := tk.Count(text); n < 3900 || n > 4100 {
		t.Errorf("4000 words are %d tokens", n)
	}
	if n := len(Text(rngFor(1), 200_000)); n >= tokenizer.DefaultExactBytes {
		t.Logf("200k words are %d bytes, past exact_bytes %d", n, tokenizer.DefaultExactBytes)
	}
}

func TestLargePromptModesOf(t *testing.T) {
	for arm, want := range map[string]string{"envoy": "-", "floor": "buffered", "tokenlb": "buffered,duplex"} {
		if got := strings.Join(largePromptModesOf(arm), ","); got != want {
			t.Errorf("%s: modes %s, want %s", arm, got, want)
		}
	}
}

// TestCountBounds: the parse-and-count bounds come from the histogram's
// buckets between two reads: the first bucket whose count since the first
// read reaches the quantile.
func TestCountBounds(t *testing.T) {
	read := func(counts ...int) []bucket {
		t.Helper()
		text := "# HELP tokenlb_tokenize_duration_seconds x\n# TYPE tokenlb_tokenize_duration_seconds histogram\n"
		for i, le := range []string{"0.001", "0.01", "0.1", "+Inf"} {
			text += fmt.Sprintf("tokenlb_tokenize_duration_seconds_bucket{le=%q} %d\n", le, counts[i])
		}
		text += "tokenlb_tokenize_duration_seconds_sum 1\ntokenlb_tokenize_duration_seconds_count 1\nother_bucket{le=\"1\"} 5\n"
		b, err := parseBuckets(strings.NewReader(text), "tokenlb_tokenize_duration_seconds")
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	before := read(10, 10, 10, 10) // 10 earlier, all under 1 ms
	// Since then: 50 under 1 ms, 49 between 1 and 10 ms, 1 between 10 and 100 ms.
	after := read(60, 109, 110, 110)
	for _, tc := range []struct {
		q    float64
		want float64
	}{{0.5, 1}, {0.99, 10}, {1, 100}} {
		if got := atMost(before, after, tc.q); got != tc.want {
			t.Errorf("quantile %v: at most %v ms, want %v", tc.q, got, tc.want)
		}
	}
	if got := atMost(before, read(10, 10, 10, 11), 0.99); !math.IsInf(got, 1) {
		t.Errorf("an observation past the last finite bucket: at most %v ms, want +Inf", got)
	}
}
