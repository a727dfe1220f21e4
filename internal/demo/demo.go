// Package demo runs tokenlb's local demonstration: Envoy 1.40 on
// deploy/envoy.yaml, tokenlb, and three llmsim backends, all on loopback,
// under a mixed workload of small and very large prompts, with a live view
// of where requests go and each host's in-flight tokens.
package demo

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/tokenlb/tokenlb/internal/bench"
	"github.com/tokenlb/tokenlb/internal/envoycfg"
	"github.com/tokenlb/tokenlb/internal/proc"
)

// Options configure a demo run.
type Options struct {
	Envoy   string // Envoy 1.40 binary
	Tokenlb string // tokenlb binary
	Llmsim  string // llmsim binary
	Config  string // deploy/envoy.yaml
	// Duration is how long the clients send traffic, counted once
	// everything is up; 0 runs until ctx is cancelled (Ctrl-C).
	Duration    time.Duration
	Concurrency int
	Seed        uint64
	Out         io.Writer
}

// Run starts everything, drives the workload and prints the live view until
// ctx is done or Duration passes (counted from when everything is up), then
// stops every process it started.
func Run(ctx context.Context, o Options) error {
	dir, err := os.MkdirTemp("", "tokenlb-demo")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	procs := &proc.Group{Dir: dir}
	defer procs.StopAll()

	var hosts []string
	for range 3 {
		port, err := proc.FreePort()
		if err != nil {
			return err
		}
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		hosts = append(hosts, addr)
		if err := procs.Start("llmsim", o.Llmsim, "--listen", addr); err != nil {
			return err
		}
	}
	grpcPort, _ := proc.FreePort()
	adminPort, _ := proc.FreePort()
	admin := fmt.Sprintf("http://127.0.0.1:%d", adminPort)
	if err := procs.Start("tokenlb", o.Tokenlb, "--listen", fmt.Sprintf("127.0.0.1:%d", grpcPort),
		"--admin", fmt.Sprintf("127.0.0.1:%d", adminPort), "--hosts", strings.Join(hosts, ",")); err != nil {
		return err
	}
	if err := procs.WaitReady(ctx, admin+"/readyz"); err != nil {
		return err
	}
	eo, err := procs.StartEnvoy(ctx, o.Envoy, o.Config, envoycfg.Options{TokenlbPort: grpcPort, Backends: hosts},
		"--concurrency", "2", "-l", "warning")
	if err != nil {
		return err
	}
	listenPort := eo.ListenPort
	fmt.Fprintf(o.Out, "Envoy on 127.0.0.1:%d → tokenlb (admin %s) → llmsim %s\n", listenPort, admin, strings.Join(hosts, ", "))
	fmt.Fprintf(o.Out, "Workload: %d clients; prompts of ~30 (60%%), ~2,750 (25%%) and ~7,500 (15%%) tokens; a third streamed. Ctrl-C stops.\n", o.Concurrency)
	fmt.Fprintf(o.Out, "load: the expected work tokenlb balances on (a prompt's prefill until its first token, decode_weight of its decode until its end);\n"+
		"prefilling / in flight: prompt tokens waiting for their first token / of every request in flight.\n\n")

	if o.Duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, o.Duration)
		defer cancel()
	}
	st := &stats{}
	var wg sync.WaitGroup
	for i := range o.Concurrency {
		wg.Go(func() {
			client(ctx, fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", listenPort), o.Seed+uint64(i), st)
		})
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	start := time.Now()
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case <-tick.C:
			if err := procs.Exited(); err != nil {
				return err
			}
			view(o.Out, time.Since(start), admin, st)
		}
	}
	wg.Wait()
	// The aborted requests' charges come back as Envoy closes their streams.
	fmt.Fprintln(o.Out, "\nstopped the clients; every charge should now return to 0:")
	for deadline := time.Now().Add(5 * time.Second); inFlight(admin) != 0 && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	view(o.Out, time.Since(start), admin, st)
	if errors.Is(ctx.Err(), context.DeadlineExceeded) || errors.Is(ctx.Err(), context.Canceled) {
		return nil
	}
	return ctx.Err()
}

// client sends requests back to back until ctx is done.
func client(ctx context.Context, url string, seed uint64, st *stats) {
	rng := rand.New(rand.NewPCG(seed, 42))
	for ctx.Err() == nil {
		words := 30
		switch r := rng.Float64(); {
		case r < 0.15:
			words = 7500
		case r < 0.40:
			words = 2750
		}
		words = int(float64(words) * (0.8 + 0.4*rng.Float64())) // ±20%
		stream := rng.IntN(3) == 0
		body, _ := json.Marshal(map[string]any{"model": "llmsim", "stream": stream, "max_tokens": 16 + rng.IntN(48),
			"messages": []map[string]string{{"role": "user", "content": bench.Text(rng, words)}}})
		start := time.Now()
		req, _ := http.NewRequestWithContext(ctx, "POST", url, bytes.NewReader(body))
		req.Header.Set("content-type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			if ctx.Err() == nil {
				st.record(0, err)
			}
			continue
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if ctx.Err() != nil {
			return
		}
		if resp.StatusCode != 200 {
			st.record(0, fmt.Errorf("status %d", resp.StatusCode))
			continue
		}
		st.record(time.Since(start), nil)
	}
}

type stats struct {
	mu        sync.Mutex
	done      int
	errs      int
	lastErr   string
	latencies []time.Duration
}

func (s *stats) record(d time.Duration, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.errs++
		s.lastErr = err.Error()
		return
	}
	s.done++
	s.latencies = append(s.latencies, d)
}

type hostLoad struct {
	Address string `json:"address"`
	// Load is what tokenlb balances on: expected microseconds of the
	// host's work not yet released (see the README's cost model).
	Load             int64 `json:"load"`
	PrefillingTokens int64 `json:"prefilling_tokens"`
	InFlightTokens   int64 `json:"in_flight_tokens"`
	InFlightRequests int64 `json:"in_flight_requests"`
	Picks            int64 `json:"picks"`
}

func hostLoads(admin string) []hostLoad {
	var v struct{ Hosts []hostLoad }
	if resp, err := http.Get(admin + "/debug/hosts"); err == nil {
		json.NewDecoder(resp.Body).Decode(&v)
		resp.Body.Close()
	}
	return v.Hosts
}

// inFlight is the total of in-flight tokens and requests, -1 if unknown.
func inFlight(admin string) int64 {
	hs := hostLoads(admin)
	if hs == nil {
		return -1
	}
	var n int64
	for _, h := range hs {
		n += h.InFlightTokens + h.InFlightRequests
	}
	return n
}

func view(w io.Writer, elapsed time.Duration, admin string, st *stats) {
	hosts := hostLoads(admin)
	st.mu.Lock()
	lat := slices.Clone(st.latencies)
	done, errs, lastErr := st.done, st.errs, st.lastErr
	st.mu.Unlock()
	slices.Sort(lat)
	pct := func(p float64) time.Duration {
		if len(lat) == 0 {
			return 0
		}
		return lat[min(len(lat)-1, int(p*float64(len(lat))))].Round(time.Millisecond)
	}
	fmt.Fprintf(w, "t=%3.0fs  done %d  errors %d  latency p50 %v p90 %v\n", elapsed.Seconds(), done, errs, pct(0.5), pct(0.9))
	for _, h := range hosts {
		// The bar is the load tokenlb balances on, a block per 50 ms.
		bar := strings.Repeat("█", int(min(40, h.Load/50_000)))
		fmt.Fprintf(w, "  %-21s load %5d ms  prefilling %6d tokens  in flight %6d tokens %3d reqs  routed %5d  %s\n",
			h.Address, h.Load/1000, h.PrefillingTokens, h.InFlightTokens, h.InFlightRequests, h.Picks, bar)
	}
	if lastErr != "" {
		fmt.Fprintf(w, "  last error: %s\n", lastErr)
	}
}
