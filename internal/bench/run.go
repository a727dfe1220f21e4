package bench

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/tokenlb/tokenlb/internal/envoycfg"
	"github.com/tokenlb/tokenlb/internal/proc"
	"github.com/tokenlb/tokenlb/internal/sim"
)

// Arms are the load balancers compared by default, each through the same
// Envoy build in front of fresh llmsim instances.
var Arms = []string{"envoy-round-robin", "envoy-least-request", "tokenlb"}

// Variant is a tokenlb arm: tokenlb flags and how Envoy shows it responses
// (an envoycfg Response mode; "" is deploy/envoy.yaml as shipped).
type Variant struct {
	Flags    []string
	Response string
	// Config is the deploy/ Envoy configuration; "" is envoy.yaml.
	Config string
	About  string
}

// Variants are the tokenlb arms. "tokenlb" is the shipped configuration;
// the others switch the cost model's pieces on in turn, or see responses
// another way.
var Variants = map[string]Variant{
	"tokenlb": {About: "as shipped: two-phase cost, output estimation, calibration; responses seen by the observer filter"},
	"tokenlb-prompt-only": {Flags: []string{"--two-phase=false", "--estimate-output=false", "--calibrate=false", "--decode-weight=0"},
		About: "prompt tokens held until the response ends (the original design)"},
	"tokenlb-two-phase": {Flags: []string{"--estimate-output=false", "--calibrate=false"},
		About: "+ two-phase cost: prefill released at the first token, decode (max_tokens) held to the end"},
	"tokenlb-estimate-output": {Flags: []string{"--calibrate=false"},
		About: "+ output estimation from usage"},
	"tokenlb-stall": {Flags: []string{"--stall-weight=1"},
		About: "as shipped, plus the stall term: long prompts kept away from hosts with many decoding requests"},
	"tokenlb-streamed": {Response: "streamed", Flags: []string{"--observer=false"},
		About: "as shipped, but the routing filter sees the response body (STREAMED): a round trip per chunk"},
	"tokenlb-estimate": {Response: "estimate", Flags: []string{"--observer=false", "--estimate-first-token"},
		About: "as shipped, but no response body: prefill released at the estimated first token, the rest at the end of the stream"},
	"tokenlb-no-output-estimate": {Flags: []string{"--estimate-output=false"},
		About: "as shipped, but without output estimation: a request without max_tokens is charged the prior output length"},
	"tokenlb-follow-all": {Flags: []string{"--follow-interval=0"},
		About: "as shipped, but every streamed response followed to its end for its usage (a message a chunk), not one a second per host"},
	"tokenlb-no-affinity": {Flags: []string{"--prefix-max-extra-load=0"},
		About: "as shipped, without prefix affinity"},
	"tokenlb-feedback": {Flags: []string{"--backend-metrics-interval=1s"},
		About: "as shipped, plus the backends' engine metrics read every second (replicas see each other's requests)"},
	"tokenlb-override-host": {Config: "envoy-override-host.yaml",
		About: "as shipped, behind deploy/envoy-override-host.yaml: Envoy's override_host policy, health checks and retries on the fallback hosts tokenlb lists"},
	"tokenlb-no-health": {Flags: []string{"--health-check-interval=0", "--consecutive-5xx=0"},
		About: "as shipped, without health checks or passive ejection"},
	"tokenlb-bytes": {Flags: []string{"--tokenizer-engine=bytes"},
		About: "as shipped, but counting a token per 4 bytes of text instead of tokens: what exact counting is worth"},
}

// Options configure one run of one arm.
type Options struct {
	Envoy, Tokenlb string // binaries
	DeployDir      string // the repository's deploy/ folder
	Backends       int
	// Backend is what serves requests: llmsim (the zero value) or llm-d-sim.
	Backend Backend
	// EPP is llm-d's endpoint picker binary, for the llm-d arm, and
	// PeakPrefill its peakPrefillThroughput (PeakPrefillThroughput).
	EPP         string
	PeakPrefill float64
	// TokenlbFlags are added to every tokenlb arm's flags (for tuning).
	TokenlbFlags []string
	// SlowHosts run at half speed (every cost doubled): the first ones.
	SlowHosts int
	TimeScale float64 // llmsim time scale
	// Open loop: Poisson arrivals at Utilization of the backends' estimated
	// capacity. Closed loop (Concurrency > 0): that many clients back to back.
	Utilization float64
	Concurrency int
	Seed        uint64
	Log         io.Writer
	// LogDir, when set, keeps each run's process logs and configurations
	// in a folder of their own under it; otherwise they are removed.
	LogDir string
	// Replicas runs that many Envoy (+ tokenlb) pairs in front of the same
	// backends; the client sends request i to pair i mod Replicas. 0 is 1.
	Replicas int
	// Direct, when in (0, 1), is the share of requests sent straight to
	// backend-1, around Envoy and tokenlb (another client, a batch job):
	// load that only the backend's own metrics show.
	Direct float64
	// KillAt, when in (0, 1), stops backend-1 (its server closed, its
	// connections cut) when that share of the requests has been sent.
	KillAt float64

	// Capacity, when positive, is the backends' measured capacity on this
	// workload (requests/s, MeasureCapacity): the open loop runs at
	// Utilization of it rather than of an estimate from llmsim's costs.
	Capacity float64

	// For the overhead run: a fixed open-loop rate (requests/s) instead of
	// one derived from Utilization, and hooks given tokenlb's pid before
	// and after the workload.
	fixedRate      float64
	onStart, onEnd func(pid int)
}

// Result is one arm's outcome on one workload.
type Result struct {
	Arm       string             `json:"arm"`
	Requests  int                `json:"requests"`
	Errors    int                `json:"errors"`
	TTFT      Stats              `json:"ttft_ms"`
	E2E       Stats              `json:"e2e_ms"`
	HostShare map[string]float64 `json:"host_share"`
	// Throughput is completed requests per second of the run's wall time.
	Throughput float64 `json:"throughput_rps"`
	// With KillAt: failed requests sent before the kill (some were in
	// flight on the killed backend), failed requests sent after it, and
	// the last of those, in ms after the kill.
	KilledBefore    int     `json:"killed_errors_before,omitempty"`
	KilledAfter     int     `json:"killed_errors_after,omitempty"`
	LastErrorMillis float64 `json:"killed_last_error_ms,omitempty"`
	// For tokenlb arms: the median of |predicted - observed| / observed
	// time to first token over the run's predictions, and the regime
	// tokenlb learned for each host by the end (cost/regime.go).
	PredictionError float64                       `json:"ttft_prediction_error_median,omitempty"`
	Regimes         map[string]map[string]float64 `json:"regimes,omitempty"`
	ttfts           []float64
	e2es            []float64
	ends            []time.Time // when each completed request ended
}

// Stats summarise latencies in milliseconds.
type Stats struct {
	Mean float64 `json:"mean"`
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
}

func summarize(v []float64) Stats {
	if len(v) == 0 {
		return Stats{}
	}
	s := slices.Clone(v)
	slices.Sort(s)
	var sum float64
	for _, x := range s {
		sum += x
	}
	// Nearest rank: the smallest value with at least p of the samples at or
	// below it.
	q := func(p float64) float64 { return s[max(0, int(math.Ceil(p*float64(len(s))))-1)] }
	return Stats{Mean: sum / float64(len(s)), P50: q(0.5), P90: q(0.9), P99: q(0.99)}
}

// work estimates the backend time a request needs under llmsim's default
// costs (unscaled): its prefill, and its share of decode steps at a batch of
// about 8.
func work(r Request) time.Duration {
	d := sim.Defaults
	tokens := 0
	for _, m := range r.Messages {
		tokens += len(sim.Tokenize(m.Content)) + 9
	}
	return time.Duration(tokens)*d.PrefillTokenCost + time.Duration(r.outputs())*(d.DecodeSeqCost+d.StepOverhead/8)
}

// Rate is the open-loop arrival rate (requests per second) that loads the
// backends to the given utilization.
func Rate(reqs []Request, backends float64, utilization, timeScale float64) float64 {
	var total time.Duration
	for _, r := range reqs {
		total += work(r)
	}
	mean := total.Seconds() / float64(len(reqs)) * timeScale
	return utilization * backends / mean
}

// runDir makes the folder of one run's processes (logs, configurations):
// under logDir, kept, or a temporary one that done removes.
func runDir(logDir, name string) (dir string, done func(), err error) {
	if logDir != "" {
		if err := os.MkdirAll(logDir, 0o755); err != nil {
			return "", nil, err
		}
	}
	if dir, err = os.MkdirTemp(logDir, "tokenlb-bench-"+name+"-"); err != nil {
		return "", nil, err
	}
	if logDir != "" {
		return dir, func() {}, nil
	}
	return dir, func() { os.RemoveAll(dir) }, nil
}

// RunArm starts llmsim backends, Envoy and (for the tokenlb arm) tokenlb on
// loopback, replays reqs, and stops everything.
func RunArm(ctx context.Context, o Options, arm string, reqs []Request) (Result, error) {
	res := Result{Arm: arm, Requests: len(reqs), HostShare: map[string]float64{}}
	dir, done, err := runDir(o.LogDir, arm)
	if err != nil {
		return res, err
	}
	defer done()
	g := &proc.Group{Dir: dir}
	defer g.StopAll()

	b, err := startBackends(ctx, g, o)
	if err != nil {
		return res, err
	}
	defer b.stop()
	urls, admins, err := startFronts(ctx, g, o, arm, b.hosts)
	if err != nil {
		return res, err
	}
	l := newLoad(o, b, urls, len(reqs), &res)
	defer l.client.CloseIdleConnections()

	if o.onStart != nil {
		o.onStart(g.PID("tokenlb"))
	}
	began := time.Now()
	l.drive(ctx, reqs)
	res.Throughput = float64(len(res.e2es)) / time.Since(began).Seconds()
	if o.onEnd != nil {
		o.onEnd(g.PID("tokenlb"))
	}
	if err := g.Exited(); err != nil {
		return res, err
	}
	if len(admins) > 0 {
		readPredictions(admins[0], &res)
	}
	l.summarize()
	return res, ctx.Err()
}

// front is how an arm stands in front of the backends: one of the deploy/
// Envoy configurations, with a tokenlb variant or an Envoy lb_policy, or
// llm-d's endpoint picker behind its own Envoy configuration.
type front struct {
	config  string // in deploy/
	tokenlb bool   // whether the arm runs tokenlb, as variant says
	variant Variant
	policy  string // for the Envoy-only arms: ROUND_ROBIN or LEAST_REQUEST
	llmd    bool   // the llm-d arm
}

// frontFor returns the front of arm, one of Variants or an Envoy-only arm.
func frontFor(arm string) (front, error) {
	variant, isTokenlb := Variants[arm]
	f := front{config: "envoy.yaml", tokenlb: isTokenlb, variant: variant}
	switch {
	case isTokenlb:
		if variant.Config != "" {
			f.config = variant.Config
		}
	case arm == "llm-d":
		f.llmd = true
	case arm == "envoy-round-robin" || arm == "envoy-least-request":
		f.config = "envoy-override-host.yaml"
		f.policy = map[string]string{"envoy-round-robin": "ROUND_ROBIN", "envoy-least-request": "LEAST_REQUEST"}[arm]
	default:
		return f, fmt.Errorf("bench: unknown arm %q", arm)
	}
	return f, nil
}

// startFronts starts o.Replicas (at least one) fronts of arm in front of
// hosts, one after another, and returns the URL of each one's chat
// completions endpoint and, for the tokenlb arms, of each tokenlb's admin
// server.
func startFronts(ctx context.Context, g *proc.Group, o Options, arm string, hosts []string) (urls, admins []string, err error) {
	f, err := frontFor(arm)
	if err != nil {
		return nil, nil, err
	}
	for r := range max(1, o.Replicas) {
		url, admin, err := f.start(ctx, g, o, r, hosts)
		if err != nil {
			return nil, nil, err
		}
		urls = append(urls, url)
		if admin != "" {
			admins = append(admins, admin)
		}
	}
	return urls, admins, nil
}

// start starts replica r of f: its tokenlb, if any, and once that is
// ready, Envoy. It returns the URL of Envoy's chat completions endpoint and
// that of tokenlb's admin server ("" without tokenlb).
func (f front) start(ctx context.Context, g *proc.Group, o Options, r int, hosts []string) (url, admin string, err error) {
	if f.llmd {
		url, err := startLLMD(ctx, g, o, r, hosts)
		return url, "", err
	}
	eo := envoycfg.Options{Backends: hosts, Policy: f.policy}
	if f.tokenlb {
		name := "tokenlb"
		if r > 0 {
			name = fmt.Sprintf("tokenlb-%d", r+1)
		}
		port, adminPort, err := startTokenlb(ctx, g, o, name, f.variant, hosts)
		if err != nil {
			return "", "", err
		}
		eo.TokenlbPort = port
		eo.Response = f.variant.Response
		admin = fmt.Sprintf("http://127.0.0.1:%d", adminPort)
	}
	eo, err = g.StartEnvoy(ctx, o.Envoy, filepath.Join(o.DeployDir, f.config), eo, "--concurrency", "1", "-l", "error")
	if err != nil {
		return "", "", err
	}
	return fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", eo.ListenPort), admin, nil
}

// startTokenlb starts tokenlb as name in front of hosts, with the variant's
// flags and then o.TokenlbFlags, waits until it is ready, and returns the
// ports of its ext_proc and admin servers.
func startTokenlb(ctx context.Context, g *proc.Group, o Options, name string, v Variant, hosts []string) (grpcPort, adminPort int, err error) {
	grpcPort, _ = proc.FreePort()
	adminPort, _ = proc.FreePort()
	args := append([]string{"--listen", fmt.Sprintf("127.0.0.1:%d", grpcPort),
		"--admin", fmt.Sprintf("127.0.0.1:%d", adminPort), "--hosts", strings.Join(hosts, ","), "--log-level", "warn"},
		append(slices.Clone(v.Flags), o.TokenlbFlags...)...)
	if err := g.Start(name, o.Tokenlb, args...); err != nil {
		return 0, 0, err
	}
	if err := g.WaitReady(ctx, fmt.Sprintf("http://127.0.0.1:%d/readyz", adminPort)); err != nil {
		return 0, 0, err
	}
	return grpcPort, adminPort, nil
}

// load is one run's workload on its way: where each request goes, and the
// samples that came back, gathered into a Result.
type load struct {
	o      Options
	client *http.Client
	urls   []string // a front each; request i goes to urls[i mod len(urls)]
	b      *backends
	killAt int // the request sent right after backend-1 is killed; -1: none

	mu     sync.Mutex
	res    *Result
	shares map[string]int // completed requests per backend
	killed time.Time      // when backend-1 was killed
}

// newLoad prepares a load of n requests on the fronts at urls, gathered
// into res. With o.KillAt it kills backend-1 partway.
func newLoad(o Options, b *backends, urls []string, n int, res *Result) *load {
	l := &load{o: o, urls: urls, b: b, killAt: -1, res: res, shares: map[string]int{},
		client: &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1024, MaxConnsPerHost: 0}}}
	if o.KillAt > 0 && o.KillAt < 1 {
		l.killAt = int(o.KillAt * float64(n))
	}
	return l
}

// drive sends reqs, in a closed loop with o.Concurrency > 0 and in an open
// one otherwise, and waits for every response.
func (l *load) drive(ctx context.Context, reqs []Request) {
	if l.o.Concurrency > 0 {
		l.closedLoop(ctx, reqs)
	} else {
		l.openLoop(ctx, reqs)
	}
}

// closedLoop sends reqs from o.Concurrency clients, each sending its next
// request when the last one's response has ended.
func (l *load) closedLoop(ctx context.Context, reqs []Request) {
	type job struct {
		r Request
		i int
	}
	var wg sync.WaitGroup
	next := make(chan job)
	for range l.o.Concurrency {
		wg.Go(func() {
			for j := range next {
				l.record(send(ctx, l.client, l.urls[j.i%len(l.urls)], j.r))
			}
		})
	}
	for i, r := range reqs {
		if i == l.killAt {
			l.killBackend()
		}
		next <- job{r, i}
	}
	close(next)
	wg.Wait()
}

// openLoop sends reqs at Poisson arrivals, at o.fixedRate or else the rate
// that loads the backends to o.Utilization, whatever the responses do. With
// o.Direct, that share of them goes straight to backend-1.
func (l *load) openLoop(ctx context.Context, reqs []Request) {
	o := l.o
	rate := o.fixedRate
	switch {
	case rate > 0:
	case o.Capacity > 0:
		rate = o.Utilization * o.Capacity
	default:
		rate = Rate(reqs, float64(o.Backends)-float64(o.SlowHosts)/2, o.Utilization, o.TimeScale)
	}
	rng := rand.New(rand.NewPCG(o.Seed, 0xa441))
	direct := rand.New(rand.NewPCG(o.Seed, 0xd1ec))
	var wg sync.WaitGroup
	start := time.Now()
	at := time.Duration(0)
	for i, r := range reqs {
		at += time.Duration(rng.ExpFloat64() / rate * float64(time.Second))
		if d := time.Until(start.Add(at)); d > 0 {
			select {
			case <-ctx.Done():
			case <-time.After(d):
			}
		}
		if i == l.killAt {
			l.killBackend()
		}
		url := l.urls[i%len(l.urls)]
		if o.Direct > 0 && direct.Float64() < o.Direct {
			url = "http://" + l.b.hosts[0] + "/v1/chat/completions"
		}
		wg.Go(func() { l.record(send(ctx, l.client, url, r)) })
	}
	wg.Wait()
}

// killBackend kills backend-1 and notes when, so that failures can be told
// apart by whether their requests were sent before or after.
func (l *load) killBackend() {
	l.mu.Lock()
	l.killed = time.Now()
	l.mu.Unlock()
	l.b.kill()
	fmt.Fprintf(l.o.Log, "bench: backend-1 killed after %d requests\n", l.killAt)
}

// record adds one request's sample to the result.
func (l *load) record(s sample) {
	l.mu.Lock()
	defer l.mu.Unlock()
	res := l.res
	if s.err != nil {
		res.Errors++
		if l.killAt >= 0 {
			if l.killed.IsZero() || s.start.Before(l.killed) {
				res.KilledBefore++
			} else {
				res.KilledAfter++
				res.LastErrorMillis = max(res.LastErrorMillis, float64(s.start.Sub(l.killed).Milliseconds()))
			}
		}
		return
	}
	res.ttfts = append(res.ttfts, s.ttft.Seconds()*1000)
	res.e2es = append(res.e2es, s.e2e.Seconds()*1000)
	res.ends = append(res.ends, s.start.Add(s.e2e))
	l.shares[s.host]++
}

// summarize sets the result's latency statistics and each backend's share
// of the completed requests, once every request has ended.
func (l *load) summarize() {
	res := l.res
	res.TTFT, res.E2E = summarize(res.ttfts), summarize(res.e2es)
	for i := range l.b.hosts {
		name := fmt.Sprintf("backend-%d", i+1)
		if ok := len(res.e2es); ok > 0 {
			res.HostShare[name] = float64(l.shares[name]) / float64(ok)
		}
	}
}

type sample struct {
	start     time.Time
	ttft, e2e time.Duration
	host      string
	err       error
}

// send streams one request and times its first token and its end.
func send(ctx context.Context, client *http.Client, url string, r Request) sample {
	return sendHeaders(ctx, client, url, r, nil)
}

// sendHeaders is send with headers added to the request.
func sendHeaders(ctx context.Context, client *http.Client, url string, r Request, headers map[string]string) sample {
	model := r.Model
	if model == "" {
		model = "llmsim"
	}
	body, _ := json.Marshal(map[string]any{"model": model, "stream": true, "max_tokens": r.MaxTokens, "messages": r.Messages,
		"stream_options": map[string]any{"include_usage": true}})
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "POST", url, bytes.NewReader(body))
	req.Header.Set("content-type", "application/json")
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	if r.OutputTokens > 0 {
		req.Header.Set(sim.OutputHeader, strconv.Itoa(r.OutputTokens))
	}
	return sendRequest(client, req)
}

// sendRequest sends a streamed request and times its first event and its
// end.
func sendRequest(client *http.Client, req *http.Request) sample {
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return sample{start: start, err: err}
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		return sample{start: start, err: fmt.Errorf("status %d: %.200s", resp.StatusCode, b)}
	}
	// llmsim names itself in x-llmsim-instance, llm-d-sim in x-inference-pod.
	s := sample{start: start, host: cmp.Or(resp.Header.Get("x-llmsim-instance"), resp.Header.Get("x-inference-pod"))}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "data: [DONE]" {
			s.e2e = time.Since(start)
			return s
		}
		if s.ttft == 0 && strings.HasPrefix(line, "data: {") {
			s.ttft = time.Since(start)
		}
	}
	return sample{start: start, err: fmt.Errorf("stream ended without [DONE]: %v", sc.Err())}
}
