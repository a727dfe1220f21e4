package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Overhead measures what tokenlb adds to a request: Envoy alone (round
// robin) against Envoy + tokenlb, in front of backends that answer at once,
// with 1,000-token chat requests at a fixed rate. It reports both arms'
// latencies and tokenlb's CPU time per request, and writes overhead.md.
func Overhead(ctx context.Context, o Options, outDir string) error {
	const rate, n = 50.0, 500
	reqs, err := Generate("seed", 1, n)
	if err != nil {
		return err
	}
	for i := range reqs {
		reqs[i] = Request{Messages: []Message{{"user", Text(rngFor(uint64(i)), 1000)}}, MaxTokens: 8}
	}
	o.TimeScale = 1e-4 // backends answer at once
	o.Concurrency = 0
	var rows []string
	var base Result
	for _, arm := range []string{"envoy-round-robin", "tokenlb", "tokenlb-streamed", "tokenlb-estimate"} {
		var cpu0, cpu1 float64
		o.onStart = func(pid int) { cpu0 = cpuSeconds(pid) }
		o.onEnd = func(pid int) { cpu1 = cpuSeconds(pid) }
		o.fixedRate = rate
		r, err := RunArm(ctx, o, arm, reqs)
		if err != nil {
			return err
		}
		row := fmt.Sprintf("| %s | %d | %.2f | %.2f | %.2f |", arm, r.Errors, r.E2E.P50, r.E2E.P90, r.E2E.P99)
		if arm != "envoy-round-robin" {
			row += fmt.Sprintf(" %+.2f / %+.2f | %.2f |", r.E2E.P50-base.E2E.P50, r.E2E.P99-base.E2E.P99, 1000*(cpu1-cpu0)/float64(n))
		} else {
			base = r
			row += " | |"
		}
		rows = append(rows, row)
	}
	md := fmt.Sprintf("Overhead: %d chat requests of 1,000 tokens at %.0f/s, backends answering at once.\n\n"+
		"| arm | errors | E2E p50 ms | E2E p90 ms | E2E p99 ms | added p50 / p99 ms | tokenlb CPU ms per request |\n|---|---|---|---|---|---|---|\n%s\n",
		n, rate, strings.Join(rows, "\n"))
	fmt.Print(md)
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(outDir, "overhead.md"), []byte(md), 0o644)
}

// cpuSeconds reads a process's user + system CPU time from /proc.
func cpuSeconds(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // USER_HZ
}

func rngFor(seed uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, 0x0e4d)) }
