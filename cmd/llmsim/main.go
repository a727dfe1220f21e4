// Command llmsim serves a simulated OpenAI-compatible LLM backend.
//
//	llmsim --listen 127.0.0.1:8001
package main

import (
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"time"

	"github.com/tokenlb/tokenlb/sim"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8001", "listen address")
	var cfg sim.Config
	flag.Float64Var(&cfg.PrefillTokensPerSec, "prefill-tokens-per-sec", 10000, "prompt processing rate")
	flag.DurationVar(&cfg.TokenDelay, "token-delay", 20*time.Millisecond, "time per output token")
	flag.IntVar(&cfg.DefaultMaxTokens, "default-max-tokens", 64, "output length when a request sets no max_tokens")
	flag.Float64Var(&cfg.TimeScale, "time-scale", 1, "multiplies every duration")
	flag.StringVar(&cfg.Model, "model", "llmsim", "model name")
	flag.Parse()
	slog.Info("llmsim serving", "listen", *listen)
	srv := &http.Server{Addr: *listen, Handler: sim.New(cfg), ReadHeaderTimeout: 10 * time.Second}
	if err := srv.ListenAndServe(); err != nil {
		fmt.Fprintln(os.Stderr, "llmsim:", err)
		os.Exit(1)
	}
}
