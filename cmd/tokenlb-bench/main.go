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
	"strings"
	"syscall"

	"github.com/tokenlb/tokenlb/internal/bench"
)

func main() {
	// The overhead measurement's floor arm runs this program again as a
	// do-nothing ext_proc server (internal/bench/floor.go): a hidden mode.
	if len(os.Args) == 4 && os.Args[1] == bench.FloorFlag {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		check(bench.ServeFloor(ctx, os.Args[2], strings.Split(os.Args[3], ",")))
		return
	}
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
