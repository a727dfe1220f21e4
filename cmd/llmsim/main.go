// Command llmsim serves a simulated vLLM-like OpenAI-compatible backend
// (package internal/sim documents the model and its defaults).
//
//	llmsim --listen 127.0.0.1:8001
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/tokenlb/tokenlb/internal/sim"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8001", "listen address")
	d := sim.Defaults
	var c sim.Config
	flag.StringVar(&c.Name, "name", "", "instance name for the x-llmsim-instance header (default: the listen address)")
	flag.StringVar(&c.Model, "model", d.Model, "model name")
	flag.IntVar(&c.MaxNumSeqs, "max-num-seqs", d.MaxNumSeqs, "largest running batch")
	flag.IntVar(&c.MaxNumBatchedTokens, "max-num-batched-tokens", d.MaxNumBatchedTokens, "token budget of one step")
	flag.IntVar(&c.KVBlocks, "kv-blocks", d.KVBlocks, "KV-cache blocks")
	flag.IntVar(&c.BlockSize, "block-size", d.BlockSize, "tokens per KV-cache block")
	flag.DurationVar(&c.StepOverhead, "step-overhead", d.StepOverhead, "fixed time of one step")
	flag.DurationVar(&c.PrefillTokenCost, "prefill-token-cost", d.PrefillTokenCost, "step time per prefill token")
	flag.DurationVar(&c.DecodeSeqCost, "decode-seq-cost", d.DecodeSeqCost, "step time per decoding sequence")
	flag.IntVar(&c.OutputMedian, "output-median", d.OutputMedian, "median of an answer's own length (log-normal)")
	flag.Float64Var(&c.OutputSigma, "output-sigma", d.OutputSigma, "spread (σ of the log) of an answer's own length")
	flag.BoolVar(&c.IgnoreEOS, "ignore-eos", false, "answers are max_tokens long whenever a request sets it (vLLM's ignore_eos)")
	flag.Float64Var(&c.TimeScale, "time-scale", d.TimeScale, "multiplies every duration (0.1: ten times faster)")
	flag.Uint64Var(&c.Seed, "seed", d.Seed, "seed of the output-length draw")
	flag.Parse()
	if c.Name == "" {
		c.Name = *listen
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	s := sim.New(c)
	// The engine outlives the server, which needs it to finish the
	// requests in flight.
	engineCtx, stopEngine := context.WithCancel(context.Background())
	defer stopEngine()
	go s.Run(engineCtx)
	srv := &http.Server{Addr: *listen, Handler: s, ReadHeaderTimeout: 10 * time.Second}
	stopped := make(chan struct{})
	go func() {
		<-ctx.Done()
		shutdown(srv)
		close(stopped)
	}()
	slog.Info("llmsim serving", "listen", *listen)
	if err := srv.ListenAndServe(); err != nil && err != http.ErrServerClosed {
		fmt.Fprintln(os.Stderr, "llmsim:", err)
		os.Exit(1)
	}
	<-stopped
}

// shutdownTimeout bounds how long a stopping llmsim lets the requests in
// flight run.
const shutdownTimeout = 5 * time.Second

// shutdown stops srv gracefully where it can: it stops accepting
// connections and waits up to shutdownTimeout for the requests in flight,
// then closes the connections still open, cutting what is left.
func shutdown(srv *http.Server) {
	ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(ctx); errors.Is(err, context.DeadlineExceeded) {
		srv.Close()
	}
}
