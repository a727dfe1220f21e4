// Command tokenlb-bench compares tokenlb with Envoy's round robin and
// least-request through a real Envoy in front of llmsim backends, and writes
// bench/out/<profile>.{json,md} and latency CDF plots.
//
//	tokenlb-bench --envoy "$(scripts/envoy.sh)" --profiles seed,heavy --seeds 1,2,3
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tokenlb/tokenlb/bench"
)

func main() {
	var o bench.Options
	flag.StringVar(&o.Envoy, "envoy", "envoy", "Envoy 1.40 binary")
	flag.StringVar(&o.Tokenlb, "tokenlb", "bin/tokenlb", "tokenlb binary")
	flag.StringVar(&o.DeployDir, "deploy", "deploy", "the deploy/ folder")
	flag.IntVar(&o.Backends, "backends", 3, "llmsim backends")
	flag.Float64Var(&o.TimeScale, "time-scale", 0.5, "llmsim time scale (latencies are reported in real ms)")
	flag.Float64Var(&o.Utilization, "utilization", 0.8, "open loop: offered load as a fraction of estimated backend capacity")
	flag.IntVar(&o.Concurrency, "concurrency", 0, "closed loop with this many clients (0: open loop)")
	flag.IntVar(&o.Replicas, "replicas", 1, "Envoy (+ tokenlb) pairs in front of the same backends; requests alternate between them")
	flag.Float64Var(&o.Direct, "direct", 0, "share of requests sent straight to backend-1, around Envoy and tokenlb (0: none)")
	flag.Float64Var(&o.KillAt, "kill-at", 0, "stop backend-1 once this share of the requests has been sent (0: never)")
	profiles := flag.String("profiles", "seed,heavy,chat,prefix", "workload profiles; a -slow suffix (seed-slow) runs backend-1 at half speed")
	seeds := flag.String("seeds", "1,2,3", "workload seeds; each profile runs once per seed and arm")
	arms := flag.String("arms", strings.Join(bench.Arms, ","), "arms to run: envoy-round-robin, envoy-least-request, and the tokenlb variants "+variants())
	n := flag.Int("requests", 400, "requests per run")
	out := flag.String("out", "bench/out", "output folder")
	overhead := flag.Bool("overhead", false, "run the overhead measurement instead")
	tokenlbFlags := flag.String("tokenlb-flags", "", "space-separated flags added to every tokenlb arm (e.g. --decode-weight=0.2)")
	retable := flag.String("retable", "", "render the tables of an earlier run's report (a .json in the output folder) again, and exit")
	flag.Parse()
	if *retable != "" {
		rep, err := bench.ReadReport(*retable)
		if err != nil {
			fail(err)
		}
		rep.Median()
		if err := os.WriteFile(strings.TrimSuffix(*retable, ".json")+".md", []byte(rep.Table()), 0o644); err != nil {
			fail(err)
		}
		fmt.Println(rep.Table())
		return
	}
	o.TokenlbFlags = strings.Fields(*tokenlbFlags)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	o.Log = os.Stderr
	if *overhead {
		if err := bench.Overhead(ctx, o, *out); err != nil {
			fail(err)
		}
		return
	}
	mode := fmt.Sprintf("open loop at %.0f%% utilization, time scale %g", 100*o.Utilization, o.TimeScale)
	if o.Concurrency > 0 {
		mode = fmt.Sprintf("closed loop, concurrency %d, time scale %g", o.Concurrency, o.TimeScale)
	}
	for _, profile := range strings.Split(*profiles, ",") {
		// A "-slow" profile runs the first backend at half speed.
		workload, slow := strings.CutSuffix(profile, "-slow")
		o.SlowHosts = 0
		m := mode
		if slow {
			o.SlowHosts = 1
			m += ", backend-1 at half speed"
		}
		rep := bench.Report{Profile: profile, Mode: m, Requests: *n, Runs: map[string][]bench.Result{}}
		for _, s := range strings.Split(*seeds, ",") {
			seed, err := strconv.ParseUint(s, 10, 64)
			if err != nil {
				fail(fmt.Errorf("seed %q: %w", s, err))
			}
			rep.Seeds = append(rep.Seeds, seed)
			reqs, err := bench.Generate(workload, seed, *n)
			if err != nil {
				fail(err)
			}
			o.Seed = seed
			for _, arm := range strings.Split(*arms, ",") {
				start := time.Now()
				r, err := bench.RunArm(ctx, o, arm, reqs)
				if err != nil {
					fail(fmt.Errorf("%s seed %d %s: %w", profile, seed, arm, err))
				}
				fmt.Fprintf(os.Stderr, "%-7s seed %d %-20s %3d errors  TTFT p50 %6.0f p90 %6.0f ms  E2E mean %6.0f p90 %6.0f ms  (%s)\n",
					profile, seed, arm, r.Errors, r.TTFT.P50, r.TTFT.P90, r.E2E.Mean, r.E2E.P90, time.Since(start).Round(time.Second))
				if o.KillAt > 0 {
					fmt.Fprintf(os.Stderr, "        backend-1 killed: %d failed requests sent before, %d after (the last %.0f ms after the kill)\n",
						r.KilledBefore, r.KilledAfter, r.LastErrorMillis)
				}
				rep.Runs[s] = append(rep.Runs[s], r)
			}
		}
		rep.Median()
		if err := rep.Write(*out); err != nil {
			fail(err)
		}
		fmt.Println(rep.Table())
	}
}

func variants() string {
	var names []string
	for name := range bench.Variants {
		names = append(names, name)
	}
	slices.Sort(names)
	return strings.Join(names, ", ")
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "tokenlb-bench:", err)
	os.Exit(1)
}
