package bench

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
)

// Grid renders the reports in dir (one per backend setting and profile,
// as make bench-backends writes them) as one table: per cell, each arm's
// time to first token at p90 and end-to-end mean against Envoy's
// least-request and against llm-d (medians of the per-seed ratios), and
// tokenlb's median prediction error.
func Grid(dir string) (string, error) {
	paths, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil {
		return "", err
	}
	var reports []*Report
	for _, p := range paths {
		r, err := ReadReport(p)
		if err != nil {
			return "", err
		}
		if r.Backend != "" {
			reports = append(reports, r)
		}
	}
	if len(reports) == 0 {
		return "", fmt.Errorf("bench: no backend reports in %s", dir)
	}
	slices.SortFunc(reports, func(a, b *Report) int { return strings.Compare(a.name(), b.name()) })
	var b strings.Builder
	b.WriteString("| backend | profile | arm | errors | TTFT p90 ms | × least-request | × llm-d | E2E mean ms | × least-request | × llm-d | TTFT prediction error | TTFT p90 floor ms |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	p90 := func(x Result) float64 { return x.TTFT.P90 }
	e2e := func(x Result) float64 { return x.E2E.Mean }
	for _, r := range reports {
		r.Median()
		for _, a := range r.Arms {
			floor := ""
			if r.FloorTTFTP90 > 0 {
				floor = fmt.Sprintf("%.0f", r.FloorTTFTP90)
			}
			fmt.Fprintf(&b, "| %s | %s | %s | %d | %.0f | %s | %s | %.0f | %s | %s | %s | %s |\n", r.Backend, r.Profile, a.Arm,
				a.Errors, a.TTFT.P90, ratio(r, a.Arm, "envoy-least-request", p90), ratio(r, a.Arm, "llm-d", p90),
				a.E2E.Mean, ratio(r, a.Arm, "envoy-least-request", e2e), ratio(r, a.Arm, "llm-d", e2e), predictionError(r, a.Arm), floor)
		}
	}
	return b.String(), nil
}

// ratio is the median over seeds of arm's f over base's, or "" when either
// did not run (or it is base itself).
func ratio(r *Report, arm, base string, f func(Result) float64) string {
	if arm == base {
		return ""
	}
	per, med := r.Paired(arm, base, f)
	if len(per) == 0 {
		return ""
	}
	return fmt.Sprintf("%.2f", 1+med)
}

// predictionError is the median over seeds of arm's median prediction
// error, or "" for an arm that predicts nothing.
func predictionError(r *Report, arm string) string {
	var v []float64
	for _, seed := range r.Seeds {
		for _, x := range r.Runs[fmt.Sprint(seed)] {
			if x.Arm == arm && x.PredictionError > 0 {
				v = append(v, x.PredictionError)
			}
		}
	}
	if len(v) == 0 {
		return ""
	}
	slices.Sort(v)
	return fmt.Sprintf("%.0f%%", 100*v[len(v)/2])
}

// median returns the median of v, 0 when empty.
func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
