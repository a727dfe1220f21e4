package bench

import (
	"context"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/tokenlb/tokenlb/internal/proc"
	"github.com/tokenlb/tokenlb/internal/sim"
)

func TestGenerateIsReproducible(t *testing.T) {
	for _, p := range Profiles {
		a, _ := Generate(p, 7, 50)
		b, _ := Generate(p, 7, 50)
		c, _ := Generate(p, 8, 50)
		if !reflect.DeepEqual(a, b) {
			t.Errorf("%s: same seed, different requests", p)
		}
		if reflect.DeepEqual(a, c) {
			t.Errorf("%s: different seeds, same requests", p)
		}
	}
	if _, err := Generate("nope", 1, 1); err == nil {
		t.Error("unknown profile accepted")
	}
}

func TestSizeMix(t *testing.T) {
	for _, tc := range []struct {
		profile string
		want    [3]float64 // share of ~30, ~2,750 and ~7,500
	}{{"seed", [3]float64{0.5, 0.25, 0.25}}, {"heavy", [3]float64{0.2, 0.4, 0.4}}} {
		reqs, _ := Generate(tc.profile, 1, 4000)
		var got [3]float64
		for _, r := range reqs {
			n := len(strings.Fields(r.Messages[0].Content))
			for i, size := range []float64{30, 2750, 7500} {
				if float64(n) >= 0.8*size-1 && float64(n) <= 1.2*size+1 {
					got[i]++
				}
			}
			if r.MaxTokens < 32 || r.MaxTokens > 96 {
				t.Fatalf("max_tokens %d outside 32-96", r.MaxTokens)
			}
		}
		for i := range got {
			if share := got[i] / 4000; math.Abs(share-tc.want[i]) > 0.03 {
				t.Errorf("%s: size class %d is %.2f of requests, want %.2f", tc.profile, i, share, tc.want[i])
			}
		}
	}
}

func TestSharedPrefixes(t *testing.T) {
	reqs, _ := Generate("prefix", 1, 300)
	docs := map[string]int{}
	for _, r := range reqs {
		doc, _, _ := strings.Cut(r.Messages[0].Content, "\n\nquestion:")
		docs[doc]++
		if n := len(strings.Fields(doc)); n != 3000 {
			t.Fatalf("document of %d words", n)
		}
	}
	// Every document is asked about; the first by about 40% + 60%/48.
	if len(docs) < prefixDocs*3/4 || len(docs) > prefixDocs {
		t.Fatalf("%d distinct documents", len(docs))
	}
	hot := 0
	for _, n := range docs {
		hot = max(hot, n)
	}
	if share := float64(hot) / float64(len(reqs)); share < 0.33 || share > 0.50 {
		t.Fatalf("the most asked document has %.2f of requests, want about 0.41", share)
	}
	chat, _ := Generate("chat", 1, 300)
	systems := map[string]bool{}
	for _, r := range chat {
		if r.Messages[0].Role != "system" || r.Messages[len(r.Messages)-1].Role != "user" {
			t.Fatalf("chat request shape %v", r.Messages[0].Role)
		}
		systems[r.Messages[0].Content] = true
	}
	if len(systems) != 4 {
		t.Fatalf("%d system prompts, want 4 shared ones", len(systems))
	}
}

func TestWordsAreOneLlmsimToken(t *testing.T) {
	for _, w := range vocabulary {
		if n := len(sim.Tokenize(w)); n != 1 {
			t.Errorf("%q is %d llmsim tokens", w, n)
		}
	}
}

func TestRate(t *testing.T) {
	// 1,000 prompt tokens at 50 µs (the chat template adds 9) and 10 output
	// tokens at 0.1 + 4/8 ms: 50.45 ms + 6 ms of work each.
	reqs := []Request{{Messages: []Message{{"user", strings.Repeat("time ", 1000)}}, MaxTokens: 10}}
	want := 0.8 * 3 / (0.05045 + 0.006)
	if got := Rate(reqs, 3.0, 0.8, 1); math.Abs(got-want) > 1e-9 {
		t.Fatalf("Rate = %v, want %v", got, want)
	}
	if got := Rate(reqs, 3.0, 0.8, 0.5); math.Abs(got-2*want) > 1e-9 {
		t.Fatalf("Rate at time scale 0.5 = %v, want %v", got, 2*want)
	}
}

func TestSummarize(t *testing.T) {
	var v []float64
	for i := 100; i >= 1; i-- {
		v = append(v, float64(i))
	}
	// Nearest rank on 1..100: p50 is 50, p90 is 90, p99 is 99.
	if got, want := summarize(v), (Stats{Mean: 50.5, P50: 50, P90: 90, P99: 99}); got != want {
		t.Fatalf("summarize = %+v, want %+v", got, want)
	}
}

func TestReport(t *testing.T) {
	run := func(arm string, ttft, e2e float64) Result {
		return Result{Arm: arm, Requests: 10, TTFT: Stats{ttft, ttft, ttft, ttft}, E2E: Stats{e2e, e2e, e2e, e2e},
			HostShare: map[string]float64{"backend-1": 0.5, "backend-2": 0.5}, ttfts: []float64{ttft}, e2es: []float64{e2e}}
	}
	r := Report{Profile: "seed", Mode: "test", Seeds: []uint64{1, 2, 3}, Requests: 10, Runs: map[string][]Result{
		"1": {run("envoy-least-request", 100, 1000), run("tokenlb", 50, 900), run("tokenlb-two-phase", 80, 1000)},
		"2": {run("envoy-least-request", 300, 3000), run("tokenlb", 60, 950), run("tokenlb-two-phase", 80, 1000)},
		"3": {run("envoy-least-request", 200, 2000), run("tokenlb", 70, 5000), run("tokenlb-two-phase", 80, 1000)},
	}}
	r.Median()
	if len(r.Arms) != 3 || r.Arms[0].TTFT.P90 != 200 || r.Arms[1].E2E.Mean != 950 || r.Arms[1].Requests != 10 ||
		r.Arms[2].Arm != "tokenlb-two-phase" {
		t.Fatalf("medians %+v", r.Arms)
	}
	// Paired by seed: TTFT 50/100, 60/300, 70/200 → -50%, -80%, -65%;
	// E2E 900/1000, 950/3000, 5000/2000 → -10%, -68%, +150%.
	if tab := r.Table(); !strings.Contains(tab, "| tokenlb | **-65%** (-50, -80, -65) | **-65%** (-50, -80, -65) | **-10%** (-10, -68, +150) |") {
		t.Fatalf("table:\n%s", tab)
	}
	if s := r.Arms[1].HostShare; s["backend-1"] != 0.5 || s["backend-2"] != 0.5 {
		t.Fatalf("host share %v", s)
	}
	dir := t.TempDir()
	if err := r.Write(dir); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"seed.json", "seed.md", "seed-ttft.png", "seed-e2e.png"} {
		if st, err := os.Stat(filepath.Join(dir, f)); err != nil || st.Size() == 0 {
			t.Errorf("%s: %v", f, err)
		}
	}
	// The JSON renders the same tables again.
	back, err := ReadReport(filepath.Join(dir, "seed.json"))
	if err != nil {
		t.Fatal(err)
	}
	back.Median()
	if back.Table() != r.Table() {
		t.Fatalf("table from JSON:\n%s\nwant:\n%s", back.Table(), r.Table())
	}
}

// TestRunArm runs every arm briefly through a real Envoy.
func TestRunArm(t *testing.T) {
	root, _ := filepath.Abs(filepath.Join("..", ".."))
	envoy, err := proc.FindEnvoy(root)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("no Envoy 1.40: %v", err)
		}
		t.Skipf("no Envoy 1.40 (%v); run make tools", err)
	}
	bin := t.TempDir()
	if err := proc.Build(root, bin, "./cmd/tokenlb"); err != nil {
		t.Fatal(err)
	}
	reqs, _ := Generate("seed", 1, 24)
	o := Options{Envoy: envoy, Tokenlb: filepath.Join(bin, "tokenlb"), DeployDir: filepath.Join(root, "deploy"),
		Backends: 3, TimeScale: 0.02, Concurrency: 4, Seed: 1}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, arm := range Arms {
		r, err := RunArm(ctx, o, arm, reqs)
		if err != nil {
			t.Fatalf("%s: %v", arm, err)
		}
		var share float64
		for _, s := range r.HostShare {
			share += s
		}
		if r.Errors != 0 || len(r.e2es) != len(reqs) || math.Abs(share-1) > 1e-9 || r.TTFT.P50 > r.E2E.P50 || r.TTFT.P50 <= 0 {
			t.Fatalf("%s: %+v", arm, r)
		}
		// The round-robin arm really is Envoy's round robin: 8 requests each.
		if arm == "envoy-round-robin" {
			for h, s := range r.HostShare {
				if s != 1.0/3 {
					t.Fatalf("round robin gave %s %.3f of the requests", h, s)
				}
			}
		}
	}
}
