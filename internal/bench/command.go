package bench

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Command is one tokenlb-bench invocation, as its flags describe it: every
// workload profile run once per seed and arm, or the overhead measurement,
// or an earlier report rendered again.
type Command struct {
	// Options are every run's options. Run sets TokenlbFlags and Log;
	// Profiles and Seeds set SlowHosts and Seed run by run.
	Options Options
	// Profiles, Seeds and Arms are comma-separated lists. A profile with a
	// -slow suffix (seed-slow) runs backend-1 at half speed.
	Profiles, Seeds, Arms string
	Requests              int    // per run
	OutDir                string // where reports are written
	// TokenlbFlags are space-separated flags added to every tokenlb arm.
	TokenlbFlags string
	// Overhead runs the overhead measurement instead of the profiles.
	Overhead bool
	// Retable names an earlier report (a .json in the output folder) whose
	// tables are to be rendered again; nothing runs.
	Retable string
	// Backend is "" (llmsim, reports named after the profile alone),
	// "llmsim" or "llmd-sim" (reports named after the backend's setting
	// too, Backend.Name).
	Backend string
	// MeasureCapacity runs the open loop at Utilization of the backends'
	// measured capacity on each profile (always so for llmd-sim).
	MeasureCapacity bool
	// Grid names a folder of backend reports to render as one table
	// (Grid); nothing runs.
	Grid string
	// Churn runs the churn measurement (churn.go) once per seed instead of
	// the profiles.
	Churn bool
}

// SetFlags defines tokenlb-bench's flags in fs, each setting a field of c
// to its default.
func (c *Command) SetFlags(fs *flag.FlagSet) {
	o := &c.Options
	fs.StringVar(&o.Envoy, "envoy", "envoy", "Envoy 1.40 binary")
	fs.StringVar(&o.Tokenlb, "tokenlb", "bin/tokenlb", "tokenlb binary")
	fs.StringVar(&o.DeployDir, "deploy", "deploy", "the deploy/ folder")
	fs.IntVar(&o.Backends, "backends", 3, "llmsim backends")
	fs.Float64Var(&o.TimeScale, "time-scale", 0.5, "llmsim time scale (latencies are reported in real ms)")
	fs.Float64Var(&o.Utilization, "utilization", 0.8, "open loop: offered load as a fraction of estimated backend capacity")
	fs.IntVar(&o.Concurrency, "concurrency", 0, "closed loop with this many clients (0: open loop)")
	fs.IntVar(&o.Replicas, "replicas", 1, "Envoy (+ tokenlb) pairs in front of the same backends; requests alternate between them")
	fs.Float64Var(&o.Direct, "direct", 0, "share of requests sent straight to backend-1, around Envoy and tokenlb (0: none)")
	fs.Float64Var(&o.KillAt, "kill-at", 0, "stop backend-1 once this share of the requests has been sent (0: never)")
	fs.StringVar(&c.Profiles, "profiles", "seed,heavy,chat,prefix", "workload profiles; a -slow suffix (seed-slow) runs backend-1 at half speed")
	fs.StringVar(&c.Seeds, "seeds", "1,2,3", "workload seeds; each profile runs once per seed and arm")
	fs.StringVar(&c.Arms, "arms", strings.Join(Arms, ","), "arms to run: envoy-round-robin, envoy-least-request, llm-d (llm-d's endpoint picker), and the tokenlb variants "+variantNames())
	fs.IntVar(&c.Requests, "requests", 400, "requests per run")
	fs.StringVar(&c.OutDir, "out", "bench/out", "output folder")
	fs.BoolVar(&c.Overhead, "overhead", false, "run the overhead measurement instead")
	fs.StringVar(&c.TokenlbFlags, "tokenlb-flags", "", "space-separated flags added to every tokenlb arm (e.g. --decode-weight=0.2)")
	fs.StringVar(&c.Retable, "retable", "", "render the tables of an earlier run's report (a .json in the output folder) again, and exit")
	fs.StringVar(&c.Backend, "backend", "", `backends: llmsim, or llmd-sim (the llm-d inference simulator at --llmd-sim); "" is llmsim with reports named after the profile alone`)
	fs.StringVar(&o.Backend.Bin, "llmd-sim", os.Getenv("LLMD_SIM_BIN"), "llm-d-inference-sim binary (default $LLMD_SIM_BIN)")
	fs.StringVar(&o.EPP, "llmd-epp", os.Getenv("LLMD_EPP_BIN"), "llm-d's endpoint picker binary, for the llm-d arm (default $LLMD_EPP_BIN)")
	fs.IntVar(&o.Backend.Slots, "slots", 4, "llmd-sim: requests an instance runs at once (--max-num-seqs)")
	fs.Float64Var(&o.Backend.LoadFactor, "load-factor", 1, "llmd-sim: how much slower it gets with every slot busy (--time-factor-under-load)")
	fs.BoolVar(&c.MeasureCapacity, "measure-capacity", false, "open loop at --utilization of the backends' measured capacity on each profile (always so for llmd-sim)")
	fs.StringVar(&o.LogDir, "logs", "", "keep each run's process logs and configurations under this folder")
	fs.StringVar(&c.Grid, "grid", "", "render the backend reports in this folder (make bench-backends) as one table, and exit")
	fs.BoolVar(&c.Churn, "churn", false, "run the churn measurement instead: the seed profile at --utilization of --backends' capacity while backends are added, "+
		"removed gracefully, restarted and killed through tokenlb's dns discovery; writes churn.json and churn.md")
}

// variantNames lists the tokenlb variants, sorted, for the -arms help.
func variantNames() string {
	var names []string
	for name := range Variants {
		names = append(names, name)
	}
	slices.Sort(names)
	return strings.Join(names, ", ")
}

// Retable renders the tables of the report at path (a .json that
// Report.Write wrote) again: it writes them to the .md next to it and
// prints them to w.
func Retable(path string, w io.Writer) error {
	rep, err := ReadReport(path)
	if err != nil {
		return err
	}
	rep.Median()
	if err := os.WriteFile(strings.TrimSuffix(path, ".json")+".md", []byte(rep.Table()), 0o644); err != nil {
		return err
	}
	fmt.Fprintln(w, rep.Table())
	return nil
}

// Run runs what c describes, logging progress to log. For each profile in
// turn it runs every seed and arm, writes the profile's report to c.OutDir
// and prints its tables to w, so that a long benchmark keeps what finished
// before a failure. With c.Overhead it runs the overhead measurement
// instead.
func (c *Command) Run(ctx context.Context, w, log io.Writer) error {
	o := c.Options
	o.TokenlbFlags = strings.Fields(c.TokenlbFlags)
	o.Log = log
	switch c.Backend {
	case "", "llmsim":
		o.Backend.Kind = "llmsim"
	case "llmd-sim":
		o.Backend.Kind = "llmd-sim"
		if o.Backend.Bin == "" {
			return errors.New("bench: --backend llmd-sim needs the llm-d-inference-sim binary: set LLMD_SIM_BIN or --llmd-sim " +
				"(built from github.com/llm-d/llm-d-inference-sim; bench/RESULTS.md names the commit)")
		}
		if o.Backend.Slots < 1 || o.Backend.LoadFactor < 1 {
			return fmt.Errorf("bench: llmd-sim needs --slots >= 1 and --load-factor >= 1, not %d and %g", o.Backend.Slots, o.Backend.LoadFactor)
		}
	default:
		return fmt.Errorf("bench: unknown backend %q (want llmsim or llmd-sim)", c.Backend)
	}
	if c.Overhead {
		return Overhead(ctx, o, c.OutDir)
	}
	if c.Churn {
		return c.runChurn(ctx, o, w)
	}
	if slices.Contains(strings.Split(c.Arms, ","), "llm-d") {
		start := time.Now()
		peak, err := PeakPrefillThroughput(ctx, o)
		if err != nil {
			return err
		}
		o.PeakPrefill = peak
		fmt.Fprintf(log, "llm-d's peakPrefillThroughput, by its calibration recipe: %.0f tokens/s (%s)\n", peak, time.Since(start).Round(time.Second))
	}
	for _, profile := range strings.Split(c.Profiles, ",") {
		rep, err := c.runProfile(ctx, o, profile)
		if err != nil {
			return err
		}
		rep.Median()
		if err := rep.Write(c.OutDir); err != nil {
			return err
		}
		fmt.Fprintln(w, rep.Table())
	}
	return nil
}

// runProfile runs every seed and arm of one profile and returns their
// results, not yet summarised.
func (c *Command) runProfile(ctx context.Context, o Options, profile string) (*Report, error) {
	// A "-slow" profile runs the first backend at half speed.
	workload, slow := strings.CutSuffix(profile, "-slow")
	o.SlowHosts = 0
	mode := c.mode()
	if slow {
		o.SlowHosts = 1
		mode += ", backend-1 at half speed"
	}
	rep := &Report{Profile: profile, Mode: mode, Requests: c.Requests, Runs: map[string][]Result{}}
	if c.Backend != "" {
		rep.Backend = o.Backend.Name()
		rep.Mode = o.Backend.About() + ", " + mode
	}
	rep.PeakPrefill = o.PeakPrefill
	if o.Concurrency == 0 && (c.MeasureCapacity || o.Backend.Kind == "llmd-sim") {
		capacity, err := c.measure(ctx, o, workload)
		if err != nil {
			return nil, err
		}
		o.Capacity, rep.CapacityRPS = capacity, capacity
		rep.Mode += fmt.Sprintf(", capacity measured %.2f req/s", capacity)
	}
	var floors []float64
	defer func() { rep.FloorTTFTP90 = median(floors) }()
	for _, s := range strings.Split(c.Seeds, ",") {
		seed, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("seed %q: %w", s, err)
		}
		rep.Seeds = append(rep.Seeds, seed)
		reqs, err := Generate(workload, seed, c.Requests)
		if err != nil {
			return nil, err
		}
		floors = append(floors, o.Backend.floorTTFTP90(workload, reqs, o.TimeScale))
		o.Seed = seed
		for _, arm := range strings.Split(c.Arms, ",") {
			start := time.Now()
			r, err := RunArm(ctx, o, arm, reqs)
			if err != nil {
				return nil, fmt.Errorf("%s seed %d %s: %w", profile, seed, arm, err)
			}
			logRun(o, profile, seed, r, time.Since(start))
			rep.Runs[s] = append(rep.Runs[s], r)
		}
	}
	return rep, nil
}

// measure returns the backends' capacity on a profile's workload, from the
// requests of the first seed.
func (c *Command) measure(ctx context.Context, o Options, workload string) (float64, error) {
	seed, err := strconv.ParseUint(strings.Split(c.Seeds, ",")[0], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("seed: %w", err)
	}
	reqs, err := Generate(workload, seed, c.Requests)
	if err != nil {
		return 0, err
	}
	o.Seed = seed
	start := time.Now()
	capacity, err := MeasureCapacity(ctx, o, reqs)
	if err != nil {
		return 0, fmt.Errorf("%s: measuring capacity: %w", workload, err)
	}
	fmt.Fprintf(o.Log, "%-7s capacity %.2f req/s (closed loop, least-request, %s)\n", workload, capacity, time.Since(start).Round(time.Second))
	return capacity, nil
}

// mode describes how the runs load the backends, for the report's title.
func (c *Command) mode() string {
	o := c.Options
	if o.Concurrency > 0 {
		return fmt.Sprintf("closed loop, concurrency %d, time scale %g", o.Concurrency, o.TimeScale)
	}
	return fmt.Sprintf("open loop at %.0f%% utilization, time scale %g", 100*o.Utilization, o.TimeScale)
}

// logRun writes one line of progress to o.Log for a finished run that took
// elapsed, and with o.KillAt a second one on the requests the kill failed.
func logRun(o Options, profile string, seed uint64, r Result, elapsed time.Duration) {
	fmt.Fprintf(o.Log, "%-7s seed %d %-20s %3d errors  TTFT p50 %6.0f p90 %6.0f ms  E2E mean %6.0f p90 %6.0f ms  (%s)\n",
		profile, seed, r.Arm, r.Errors, r.TTFT.P50, r.TTFT.P90, r.E2E.Mean, r.E2E.P90, elapsed.Round(time.Second))
	if o.KillAt > 0 {
		fmt.Fprintf(o.Log, "        backend-1 killed: %d failed requests sent before, %d after (the last %.0f ms after the kill)\n",
			r.KilledBefore, r.KilledAfter, r.LastErrorMillis)
	}
}
