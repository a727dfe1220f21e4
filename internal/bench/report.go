package bench

import (
	"encoding/json"
	"fmt"
	"image/color"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

// Report is one profile's results: per-seed runs and, per arm, the median
// over seeds of every statistic.
type Report struct {
	// Backend names the backend and its setting (Backend.Name), when the
	// run chose one: the report's files are then named after both.
	Backend string `json:"backend,omitempty"`
	// CapacityRPS is the backends' measured capacity on this profile, when
	// the open loop's rate came from it (requests per second).
	CapacityRPS float64 `json:"capacity_rps,omitempty"`
	// PeakPrefill is the llm-d arm's peakPrefillThroughput, measured by
	// llm-d's calibration recipe (tokens/s).
	PeakPrefill float64 `json:"llmd_peak_prefill_tokens_per_second,omitempty"`
	// FloorTTFTP90 is, on llm-d-sim and a profile whose prompts share no
	// prefix, the p90 of the requests' own prefill times at its fastest (no
	// wait, nothing else running): no router can go below it (ms, median
	// over seeds).
	FloorTTFTP90 float64             `json:"floor_ttft_p90_ms,omitempty"`
	Profile      string              `json:"profile"`
	Mode         string              `json:"mode"`
	Seeds        []uint64            `json:"seeds"`
	Requests     int                 `json:"requests_per_run"`
	Arms         []Result            `json:"arms"`
	Runs         map[string][]Result `json:"runs"` // seed → arms
}

// Median builds the per-arm medians over the runs, for every arm that ran,
// in the order they ran.
func (r *Report) Median() {
	r.Arms = nil
	var arms []string
	for _, seed := range r.Seeds {
		for _, x := range r.Runs[fmt.Sprint(seed)] {
			if !slices.Contains(arms, x.Arm) {
				arms = append(arms, x.Arm)
			}
		}
	}
	for _, arm := range arms {
		var rs []Result
		for _, seed := range r.Seeds {
			for _, x := range r.Runs[fmt.Sprint(seed)] {
				if x.Arm == arm {
					rs = append(rs, x)
				}
			}
		}
		if len(rs) == 0 {
			continue
		}
		med := func(f func(Result) float64) float64 {
			v := make([]float64, len(rs))
			for i, x := range rs {
				v[i] = f(x)
			}
			slices.Sort(v)
			if len(v)%2 == 1 {
				return v[len(v)/2]
			}
			return (v[len(v)/2-1] + v[len(v)/2]) / 2
		}
		m := Result{Arm: arm, HostShare: map[string]float64{}}
		for _, x := range rs {
			m.Requests = x.Requests // per run
			m.Errors += x.Errors    // over all runs
			m.ttfts = append(m.ttfts, x.ttfts...)
			m.e2es = append(m.e2es, x.e2es...)
		}
		m.TTFT = Stats{med(func(x Result) float64 { return x.TTFT.Mean }), med(func(x Result) float64 { return x.TTFT.P50 }),
			med(func(x Result) float64 { return x.TTFT.P90 }), med(func(x Result) float64 { return x.TTFT.P99 })}
		m.E2E = Stats{med(func(x Result) float64 { return x.E2E.Mean }), med(func(x Result) float64 { return x.E2E.P50 }),
			med(func(x Result) float64 { return x.E2E.P90 }), med(func(x Result) float64 { return x.E2E.P99 })}
		m.Throughput = med(func(x Result) float64 { return x.Throughput })
		// Host shares over all runs together, so that they sum to 1.
		var total float64
		for _, x := range rs {
			for h, v := range x.HostShare {
				m.HostShare[h] += v
				total += v
			}
		}
		for h := range m.HostShare {
			m.HostShare[h] /= total
		}
		r.Arms = append(r.Arms, m)
	}
}

// Table renders the medians as markdown, with tokenlb's change against
// Envoy's least-request.
func (r *Report) Table() string {
	var b strings.Builder
	fmt.Fprintf(&b, "| %s (%s, seeds %v, %d requests a run) | errors, all runs | TTFT mean | TTFT p50 | TTFT p90 | TTFT p99 | E2E mean | E2E p50 | E2E p90 | E2E p99 | req/s | host share |\n",
		r.Profile, r.Mode, r.Seeds, r.Requests)
	b.WriteString("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	var lr *Result
	for i := range r.Arms {
		if r.Arms[i].Arm == "envoy-least-request" {
			lr = &r.Arms[i]
		}
	}
	for _, a := range r.Arms {
		var hs []string
		for _, h := range slices.Sorted(mapsKeys(a.HostShare)) {
			hs = append(hs, fmt.Sprintf("%.0f%%", 100*a.HostShare[h]))
		}
		fmt.Fprintf(&b, "| %s | %d | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.1f | %s |\n", a.Arm, a.Errors,
			a.TTFT.Mean, a.TTFT.P50, a.TTFT.P90, a.TTFT.P99, a.E2E.Mean, a.E2E.P50, a.E2E.P90, a.E2E.P99, a.Throughput, strings.Join(hs, " / "))
	}
	if lr != nil {
		b.WriteString("\nLatencies in ms, each the median over seeds of that statistic. Each tokenlb arm against Envoy " +
			"least-request, paired by seed: the median of the per-seed changes, then each seed's.\n\n")
		metrics := []struct {
			name string
			f    func(Result) float64
		}{
			{"TTFT p90", func(x Result) float64 { return x.TTFT.P90 }},
			{"TTFT mean", func(x Result) float64 { return x.TTFT.Mean }},
			{"E2E mean", func(x Result) float64 { return x.E2E.Mean }},
			{"E2E p90", func(x Result) float64 { return x.E2E.P90 }},
		}
		b.WriteString("| against envoy-least-request |")
		for _, m := range metrics {
			b.WriteString(" " + m.name + " |")
		}
		b.WriteString("\n|---|---|---|---|---|\n")
		for _, a := range r.Arms {
			if !strings.HasPrefix(a.Arm, "tokenlb") {
				continue
			}
			fmt.Fprintf(&b, "| %s |", a.Arm)
			for _, m := range metrics {
				per, med := r.Paired(a.Arm, "envoy-least-request", m.f)
				var ps []string
				for _, v := range per {
					ps = append(ps, fmt.Sprintf("%+.0f", 100*v))
				}
				fmt.Fprintf(&b, " **%+.0f%%** (%s) |", 100*med, strings.Join(ps, ", "))
			}
			b.WriteString("\n")
		}
	}
	return b.String()
}

// Paired returns, per seed, the relative change of f from arm base to arm
// a (0.1 = 10% higher), and the median of those changes.
func (r *Report) Paired(a, base string, f func(Result) float64) (perSeed []float64, median float64) {
	for _, seed := range r.Seeds {
		var x, y *Result
		for i, res := range r.Runs[fmt.Sprint(seed)] {
			switch res.Arm {
			case a:
				x = &r.Runs[fmt.Sprint(seed)][i]
			case base:
				y = &r.Runs[fmt.Sprint(seed)][i]
			}
		}
		if x != nil && y != nil && f(*y) > 0 {
			perSeed = append(perSeed, f(*x)/f(*y)-1)
		}
	}
	if len(perSeed) == 0 {
		return nil, 0
	}
	s := slices.Clone(perSeed)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return perSeed, s[len(s)/2]
	}
	return perSeed, (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func mapsKeys(m map[string]float64) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// ReadReport reads a report that Write wrote, without the raw latencies
// (its tables can be rendered again, not its plots).
func ReadReport(path string) (*Report, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var r Report
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &r, nil
}

// name is the report's file name without extension: the profile, after
// the backend when one was chosen (llmd-sim-4slots-lf2-prefix).
func (r *Report) name() string {
	if r.Backend != "" {
		return r.Backend + "-" + r.Profile
	}
	return r.Profile
}

// Write stores <name>.json, <name>.md and the latency CDFs
// <name>-ttft.png and <name>-e2e.png in dir (see name).
func (r *Report) Write(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, r.name()+".json"), js, 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, r.name()+".md"), []byte(r.Table()), 0o644); err != nil {
		return err
	}
	for _, which := range []string{"ttft", "e2e"} {
		if err := r.plotCDF(filepath.Join(dir, r.name()+"-"+which+".png"), which); err != nil {
			return err
		}
	}
	return nil
}

var armColors = map[string]color.Color{
	"envoy-round-robin":   color.RGBA{200, 80, 60, 255},
	"envoy-least-request": color.RGBA{230, 160, 30, 255},
	"tokenlb":             color.RGBA{40, 110, 200, 255},
	// The variants in greys and greens, so the shipped arm stands out.
	"tokenlb-prompt-only":     color.RGBA{150, 150, 150, 255},
	"tokenlb-two-phase":       color.RGBA{110, 110, 110, 255},
	"tokenlb-estimate-output": color.RGBA{60, 60, 60, 255},
	"tokenlb-stall":           color.RGBA{150, 90, 190, 255},
	"tokenlb-streamed":        color.RGBA{60, 170, 90, 255},
	"tokenlb-estimate":        color.RGBA{150, 200, 80, 255},
}

func (r *Report) plotCDF(path, which string) error {
	p := plot.New()
	p.Title.Text = fmt.Sprintf("%s: %s latency CDF (all seeds)", r.Profile, strings.ToUpper(which))
	p.X.Label.Text = which + " (ms, log scale)"
	p.Y.Label.Text = "fraction of requests"
	p.X.Scale = plot.LogScale{}
	p.X.Tick.Marker = plot.LogTicks{Prec: -1}
	p.Legend.Top = false
	p.Legend.Left = false
	for _, a := range r.Arms {
		v := a.e2es
		if which == "ttft" {
			v = a.ttfts
		}
		if len(v) == 0 {
			continue
		}
		s := slices.Clone(v)
		slices.Sort(s)
		pts := make(plotter.XYs, len(s))
		for i, x := range s {
			pts[i].X, pts[i].Y = max(x, 0.1), float64(i+1)/float64(len(s))
		}
		line, err := plotter.NewLine(pts)
		if err != nil {
			return err
		}
		line.Color = armColors[a.Arm]
		line.Width = vg.Points(2)
		p.Add(line)
		p.Legend.Add(a.Arm, line)
	}
	return p.Save(7*vg.Inch, 4.5*vg.Inch, path)
}
