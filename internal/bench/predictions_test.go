package bench

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestHistogramMedian(t *testing.T) {
	text := `# HELP tokenlb_ttft_prediction_error_ratio x
# TYPE tokenlb_ttft_prediction_error_ratio histogram
tokenlb_ttft_prediction_error_ratio_bucket{host="a",le="0.1"} 2
tokenlb_ttft_prediction_error_ratio_bucket{host="a",le="0.2"} 4
tokenlb_ttft_prediction_error_ratio_bucket{host="a",le="+Inf"} 6
tokenlb_ttft_prediction_error_ratio_sum{host="a"} 1
tokenlb_ttft_prediction_error_ratio_count{host="a"} 6
tokenlb_ttft_prediction_error_ratio_bucket{host="b",le="0.1"} 0
tokenlb_ttft_prediction_error_ratio_bucket{host="b",le="0.2"} 2
tokenlb_ttft_prediction_error_ratio_bucket{host="b",le="+Inf"} 2
tokenlb_ttft_prediction_error_ratio_sum{host="b"} 0.3
tokenlb_ttft_prediction_error_ratio_count{host="b"} 2
`
	// 8 observations: 2 at or below 0.1, 6 at or below 0.2: the 4th is
	// half way into the second bucket.
	if got := histogramMedian(strings.NewReader(text), "tokenlb_ttft_prediction_error_ratio"); math.Abs(got-0.15) > 1e-9 {
		t.Fatalf("median %v, want 0.15", got)
	}
	if got := histogramMedian(strings.NewReader(text), "missing"); got != 0 {
		t.Fatalf("median of a missing histogram %v, want 0", got)
	}
}

// TestGrid: the grid table has a row per cell and arm, with each arm's
// ratios to least-request and llm-d (medians of the per-seed ratios) and
// the floor.
func TestGrid(t *testing.T) {
	dir := t.TempDir()
	run := func(arm string, p90, e2e, predErr float64) Result {
		return Result{Arm: arm, TTFT: Stats{P90: p90}, E2E: Stats{Mean: e2e}, PredictionError: predErr, HostShare: map[string]float64{}}
	}
	r := &Report{Backend: "llmd-sim-4slots-lf1", Profile: "seed", Seeds: []uint64{1, 2}, FloorTTFTP90: 900,
		Runs: map[string][]Result{
			"1": {run("envoy-least-request", 1000, 500, 0), run("llm-d", 1100, 600, 0), run("tokenlb", 800, 450, 0.2)},
			"2": {run("envoy-least-request", 2000, 500, 0), run("llm-d", 2000, 400, 0), run("tokenlb", 1800, 500, 0.3)},
		}}
	r.Runs["2"][2].Errors = 3
	js, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, r.name()+".json"), js, 0o644); err != nil {
		t.Fatal(err)
	}
	table, err := Grid(dir)
	if err != nil {
		t.Fatal(err)
	}
	// tokenlb: p90 0.8 and 0.9 of least-request (median 0.85), 0.727 and
	// 0.9 of llm-d (0.81); E2E 0.9 and 1.0 (0.95), 0.75 and 1.25 (1.00);
	// prediction errors 20% and 30%: the upper median, 30%; errors summed
	// over the runs.
	want := "| llmd-sim-4slots-lf1 | seed | tokenlb | 3 | 1300 | 0.85 | 0.81 | 475 | 0.95 | 1.00 | 30% | 900 |"
	if !strings.Contains(table, want) {
		t.Fatalf("grid:\n%s\nwant a row\n%s", table, want)
	}
	if _, err := Grid(t.TempDir()); err == nil {
		t.Fatal("a folder without reports gave a grid")
	}
}
