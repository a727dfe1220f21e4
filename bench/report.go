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
	Profile  string              `json:"profile"`
	Mode     string              `json:"mode"`
	Seeds    []uint64            `json:"seeds"`
	Requests int                 `json:"requests_per_run"`
	Arms     []Result            `json:"arms"`
	Runs     map[string][]Result `json:"runs"` // seed → arms
}

// Median builds the per-arm medians over the runs.
func (r *Report) Median() {
	r.Arms = nil
	for _, arm := range Arms {
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
			m.Requests += x.Requests
			m.Errors += x.Errors
			m.ttfts = append(m.ttfts, x.ttfts...)
			m.e2es = append(m.e2es, x.e2es...)
		}
		m.TTFT = Stats{med(func(x Result) float64 { return x.TTFT.Mean }), med(func(x Result) float64 { return x.TTFT.P50 }),
			med(func(x Result) float64 { return x.TTFT.P90 }), med(func(x Result) float64 { return x.TTFT.P99 })}
		m.E2E = Stats{med(func(x Result) float64 { return x.E2E.Mean }), med(func(x Result) float64 { return x.E2E.P50 }),
			med(func(x Result) float64 { return x.E2E.P90 }), med(func(x Result) float64 { return x.E2E.P99 })}
		m.Throughput = med(func(x Result) float64 { return x.Throughput })
		for h := range rs[0].HostShare {
			m.HostShare[h] = med(func(x Result) float64 { return x.HostShare[h] })
		}
		r.Arms = append(r.Arms, m)
	}
}

// Table renders the medians as markdown, with tokenlb's change against
// Envoy's least-request.
func (r *Report) Table() string {
	var b strings.Builder
	fmt.Fprintf(&b, "| %s (%s, seeds %v, %d requests each) | errors | TTFT mean | TTFT p50 | TTFT p90 | TTFT p99 | E2E mean | E2E p50 | E2E p90 | E2E p99 | req/s | host share |\n",
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
	for _, a := range r.Arms {
		if a.Arm == "tokenlb" && lr != nil && lr.TTFT.P90 > 0 && lr.E2E.Mean > 0 {
			fmt.Fprintf(&b, "\ntokenlb vs Envoy least-request: TTFT p90 %+.0f%%, TTFT mean %+.0f%%, E2E mean %+.0f%%, E2E p90 %+.0f%% (latencies in ms, medians over seeds).\n",
				100*(a.TTFT.P90/lr.TTFT.P90-1), 100*(a.TTFT.Mean/lr.TTFT.Mean-1), 100*(a.E2E.Mean/lr.E2E.Mean-1), 100*(a.E2E.P90/lr.E2E.P90-1))
		}
	}
	return b.String()
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

// Write stores <profile>.json, <profile>.md and the latency CDFs
// <profile>-ttft.png and <profile>-e2e.png in dir.
func (r *Report) Write(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, r.Profile+".json"), js, 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, r.Profile+".md"), []byte(r.Table()), 0o644); err != nil {
		return err
	}
	for _, which := range []string{"ttft", "e2e"} {
		if err := r.plotCDF(filepath.Join(dir, r.Profile+"-"+which+".png"), which); err != nil {
			return err
		}
	}
	return nil
}

var armColors = map[string]color.Color{
	"envoy-round-robin":   color.RGBA{200, 80, 60, 255},
	"envoy-least-request": color.RGBA{230, 160, 30, 255},
	"tokenlb":             color.RGBA{40, 110, 200, 255},
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
