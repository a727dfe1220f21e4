// Command tokenlb-demo runs Envoy, tokenlb and three llmsim backends on
// loopback under a mixed workload and shows where requests go. `make demo`
// builds everything and runs it; DEMO_DURATION=30s stops the traffic after 30 s.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/tokenlb/tokenlb/internal/demo"
)

func main() {
	o := demo.Options{Out: os.Stdout}
	flag.StringVar(&o.Envoy, "envoy", "envoy", "Envoy 1.40 binary")
	flag.StringVar(&o.Tokenlb, "tokenlb", "bin/tokenlb", "tokenlb binary")
	flag.StringVar(&o.Llmsim, "llmsim", "bin/llmsim", "llmsim binary")
	flag.StringVar(&o.Config, "config", "deploy/envoy.yaml", "Envoy configuration to run")
	flag.DurationVar(&o.Duration, "duration", 0, "send traffic for this long once everything is up (0: until Ctrl-C); DEMO_DURATION sets it too")
	flag.IntVar(&o.Concurrency, "concurrency", 12, "concurrent clients")
	flag.Uint64Var(&o.Seed, "seed", 1, "workload seed")
	flag.Parse()
	if d := os.Getenv("DEMO_DURATION"); d != "" && o.Duration == 0 {
		v, err := time.ParseDuration(d)
		if err != nil {
			fmt.Fprintln(os.Stderr, "tokenlb-demo: DEMO_DURATION:", err)
			os.Exit(2)
		}
		o.Duration = v
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := demo.Run(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "tokenlb-demo:", err)
		os.Exit(1)
	}
}
