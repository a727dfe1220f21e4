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
	"syscall"

	"github.com/tokenlb/tokenlb/internal/bench"
)

func main() {
	var cmd bench.Command
	cmd.SetFlags(flag.CommandLine)
	flag.Parse()
	if cmd.Retable != "" {
		check(bench.Retable(cmd.Retable, os.Stdout))
		return
	}
	if cmd.Grid != "" {
		table, err := bench.Grid(cmd.Grid)
		check(err)
		fmt.Print(table)
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	check(cmd.Run(ctx, os.Stdout, os.Stderr))
}

// check exits with err, if there is one.
func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "tokenlb-bench:", err)
		os.Exit(1)
	}
}
