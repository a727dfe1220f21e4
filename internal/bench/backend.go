package bench

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/tokenlb/tokenlb/internal/proc"
	"github.com/tokenlb/tokenlb/internal/sim"
)

// Backend says which server simulates the LLM backends of a run.
type Backend struct {
	// Kind is "llmsim" (tokenlb's own simulator, in this process; the
	// default) or "llmd-sim" (the llm-d inference simulator, an independent
	// program at Bin, github.com/llm-d/llm-d-inference-sim).
	Kind string
	Bin  string
	// For llmd-sim: Slots is how many requests an instance runs at once
	// (--max-num-seqs; the rest wait), LoadFactor how much slower its
	// prefill and decode get with every slot busy (--time-factor-under-load).
	Slots      int
	LoadFactor float64
}

// llm-d-sim's costs, before the time scale: a prefill of 20 ms plus 1 ms a
// prompt token not in its prefix cache, 10 ms an output token, each times
// the load factor of the requests running there.
const (
	llmdPrefillOverhead = 20 * time.Millisecond
	llmdPrefillPerToken = time.Millisecond
	llmdPerOutputToken  = 10 * time.Millisecond
	// llmdCacheBlocks is its KV cache, in blocks of 16 tokens: 65,536
	// tokens, as llmsim's, or llmdSlotBlocks for each slot if that is more.
	// The simulator fails a request that does not fit beside those running
	// (a real engine would queue it), so every slot must be able to hold
	// the profiles' longest prompts (about 9,000 tokens).
	llmdCacheBlocks = 4096
	llmdSlotBlocks  = 1024
)

// cacheBlocks is the KV cache of an llm-d-sim instance that runs slots
// requests at once, in blocks.
func cacheBlocks(slots int) int { return max(llmdCacheBlocks, slots*llmdSlotBlocks) }

// Name says which backend and setting this is, for file names:
// llmsim-default, llmd-sim-4slots-lf2.
func (b Backend) Name() string {
	if b.Kind != "llmd-sim" {
		return "llmsim-default"
	}
	return fmt.Sprintf("llmd-sim-%dslots-lf%g", b.Slots, b.LoadFactor)
}

// About describes the backend for a report's title.
func (b Backend) About() string {
	if b.Kind != "llmd-sim" {
		return "llmsim"
	}
	return fmt.Sprintf("llm-d-inference-sim, %d slots, load factor %g", b.Slots, b.LoadFactor)
}

// floorTTFTP90 returns, for llm-d-sim and a profile whose prompts share no
// prefix, the p90 of reqs' own prefill times at its fastest (no wait,
// nothing else running: load factor 1), in ms; 0 otherwise. Its tokenizer
// counts words and punctuation; a chat message's template adds a few.
func (b Backend) floorTTFTP90(profile string, reqs []Request, timeScale float64) float64 {
	if b.Kind != "llmd-sim" || profile == "prefix" || profile == "chat" {
		return 0
	}
	var ms []float64
	for _, r := range reqs {
		words := 0
		for _, m := range r.Messages {
			words += len(strings.Fields(m.Content))
		}
		d := llmdPrefillOverhead + time.Duration(words)*llmdPrefillPerToken
		ms = append(ms, float64(d)*timeScale/float64(time.Millisecond))
	}
	return summarize(ms).P90
}

// backends are one run's backend instances, each on its own loopback port:
// llmsim servers in this process, or llm-d-sim processes in the run's group.
type backends struct {
	hosts    []string // host:port, backend-1 first
	servers  []*http.Server
	stopSims context.CancelFunc // stops every llmsim instance's engine
	g        *proc.Group        // llm-d-sim processes
}

// startBackends starts o.Backends instances of o.Backend, the first
// o.SlowHosts (llmsim only) at half speed. On error it stops those it
// started.
func startBackends(ctx context.Context, g *proc.Group, o Options) (*backends, error) {
	if o.Backend.Kind == "llmd-sim" {
		return startLLMDSims(ctx, g, o)
	}
	return startSims(ctx, o, nil)
}

// startSims starts o.Backends llmsim servers on loopback, each with
// backendConfig changed by tune (nil: as it is).
func startSims(ctx context.Context, o Options, tune func(*sim.Config)) (*backends, error) {
	simCtx, stopSims := context.WithCancel(ctx)
	b := &backends{stopSims: stopSims}
	for i := range o.Backends {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.stop()
			return nil, err
		}
		cfg := backendConfig(o, i)
		if tune != nil {
			tune(&cfg)
		}
		s := sim.New(cfg)
		go s.Run(simCtx)
		srv := &http.Server{Handler: s}
		go srv.Serve(l)
		b.servers = append(b.servers, srv)
		b.hosts = append(b.hosts, l.Addr().String())
	}
	return b, nil
}

// startLLMDSims starts o.Backends llm-d-sim processes on loopback and waits
// until each answers its health check. The simulator listens on every
// interface (it has no bind flag); only loopback traffic is ever sent to it.
func startLLMDSims(ctx context.Context, g *proc.Group, o Options) (*backends, error) {
	b := &backends{g: g, stopSims: func() {}}
	scale := func(d time.Duration) string { return time.Duration(float64(d) * o.TimeScale).String() }
	for i := range o.Backends {
		port, err := proc.FreePort()
		if err != nil {
			return nil, err
		}
		name := fmt.Sprintf("backend-%d", i+1)
		args := []string{"--port", fmt.Sprint(port), "--model", "llmsim",
			"--max-num-seqs", fmt.Sprint(o.Backend.Slots), "--time-factor-under-load", fmt.Sprint(o.Backend.LoadFactor),
			"--prefill-overhead", scale(llmdPrefillOverhead), "--prefill-time-per-token", scale(llmdPrefillPerToken),
			"--inter-token-latency", scale(llmdPerOutputToken),
			// Prefix caching on, with no KV events published.
			"--enable-kvcache", "--kv-cache-size", fmt.Sprint(cacheBlocks(o.Backend.Slots)), "--zmq-endpoint", "",
			// Its tokenizer counts words and punctuation; without this it
			// would download a model's tokenizer.
			"--force-dummy-tokenizer",
			"--max-model-len", "65536", "--max-waiting-queue-length", "100000", "--max-request-body-size-mb", "16",
			"--seed", fmt.Sprint(o.Seed + uint64(i)), "-v", "0"}
		env := []string{"POD_IP=127.0.0.1", "POD_NAME=" + name}
		if err := g.StartEnv(name, o.Backend.Bin, env, args...); err != nil {
			return nil, err
		}
		host := fmt.Sprintf("127.0.0.1:%d", port)
		if err := g.WaitReady(ctx, "http://"+host+"/health"); err != nil {
			return nil, err
		}
		b.hosts = append(b.hosts, host)
	}
	return b, nil
}

// backendConfig configures llmsim backend i+1: llmsim's default costs,
// doubled for the slow ones, and a seed of its own.
func backendConfig(o Options, i int) sim.Config {
	// IgnoreEOS: a request's max_tokens is its output length, which the
	// workloads draw (as benchmarks against vLLM set ignore_eos).
	cfg := sim.Config{Name: fmt.Sprintf("backend-%d", i+1), TimeScale: o.TimeScale, Seed: o.Seed + uint64(i), IgnoreEOS: true,
		Aliases: []string{ShortModel}}
	if i < o.SlowHosts {
		d := sim.Defaults
		cfg.StepOverhead, cfg.PrefillTokenCost, cfg.DecodeSeqCost = 2*d.StepOverhead, 2*d.PrefillTokenCost, 2*d.DecodeSeqCost
	}
	return cfg
}

// kill stops backend-1 the way a host dies: at once, its connections cut,
// with no chance to finish what is in flight.
func (b *backends) kill() {
	if b.g != nil {
		b.g.Kill("backend-1")
		return
	}
	b.servers[0].Close()
}

// stop closes every llmsim server, the last started first, then stops
// their engines (llm-d-sim processes stop with the run's group). It closes
// rather than shuts down gracefully: every request has ended by then, or
// the run was cut short, and Envoy, still running, may hold connections it
// never sent a request on, which a graceful shutdown would wait 5 s for.
func (b *backends) stop() {
	for _, srv := range slices.Backward(b.servers) {
		srv.Close()
	}
	b.stopSims()
}
