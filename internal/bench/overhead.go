package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/tokenlb/tokenlb/internal/envoycfg"
	"github.com/tokenlb/tokenlb/internal/proc"
)

// The overhead measurement: what tokenlb adds to a request, against Envoy
// alone (round robin, deploy/envoy-override-host.yaml without tokenlb's
// filters) and against the floor (floor.go: a do-nothing ext_proc server
// behind the same deploy/envoy.yaml as tokenlb, all three filters), and
// tokenlb-to-end, tokenlb behind deploy/envoy.yaml without its end filter
// (the observer follows every response to its end, as before the end
// filter existed: what the end filter saves), in front of
// llmsim backends that answer at once. Every arm runs two kinds of
// response in the same run, one after the other on the same processes: a
// non-streamed JSON answer of 8 tokens, and a server-sent event stream of
// 200 chunks (sse-200). Three rounds, the arms in a different order each
// round; the report gives the median of each number over the rounds.

// OverheadArms are the overhead measurement's arms.
var OverheadArms = []string{"envoy", "floor", "tokenlb", "tokenlb-to-end"}

// overheadKind is a kind of response: streamed or not, of so many tokens.
type overheadKind struct {
	Name      string
	Stream    bool
	MaxTokens int
}

var overheadKinds = []overheadKind{{"non-streamed", false, 8}, {"sse-200", true, 200}}

const (
	overheadRate   = 50.0 // requests/s, Poisson arrivals
	overheadN      = 400  // measured requests per arm, kind and round
	overheadWarmup = 20   // unmeasured requests before each kind
	overheadRounds = 3
	overheadPrompt = 1000 // tokens a prompt
	overheadSettle = 500 * time.Millisecond
	// overheadTimeScale is llmsim's time scale: a decode step of about 1 ms,
	// so that a streamed answer's 200 events reach Envoy one by one, as a
	// real server's do (sent at once, Envoy reads them in a few large reads
	// and forwards a tenth as many chunks), and a non-streamed answer in
	// about 20 ms.
	overheadTimeScale = 0.25
)

// OverheadSample is one arm's numbers on one kind of response, in one
// round or (in the report) the median over the rounds.
type OverheadSample struct {
	E2E struct {
		P50 float64 `json:"p50"`
		P99 float64 `json:"p99"`
	} `json:"e2e_ms"`
	// CPU time (user + system, every thread) of Envoy and of the ext_proc
	// server (0 for Envoy alone), per measured request, in ms.
	EnvoyCPU  float64 `json:"envoy_cpu_ms_per_request"`
	ServerCPU float64 `json:"server_cpu_ms_per_request"`
	// Messages is the ext_proc gRPC messages per request, both filters,
	// both directions (Envoy's stream_msgs_sent + stream_msgs_received).
	Messages float64 `json:"messages_per_request"`
	Errors   int     `json:"-"`
}

// OverheadReport is overhead.json.
type OverheadReport struct {
	Command  string                                `json:"command"`
	Machine  string                                `json:"machine"`
	Date     string                                `json:"date"`
	Workload string                                `json:"workload"`
	Runs     int                                   `json:"runs"`
	Arms     map[string]map[string]*OverheadSample `json:"arms"`
	// LargePrompts are the large-prompt rows (largeprompts.go), one round.
	LargePrompts []LargePromptRow `json:"large_prompts,omitempty"`
	// rounds are every round's samples, by arm and kind, for the table.
	rounds map[string]map[string][]OverheadSample
}

// Overhead runs the overhead measurement and writes overhead.json and
// overhead.md to outDir.
func Overhead(ctx context.Context, o Options, outDir string) error {
	began := time.Now()
	o.TimeScale = overheadTimeScale
	o.Concurrency = 0
	rep := &OverheadReport{
		Command: commandLine(os.Args), Machine: machine(o.Envoy), Date: began.UTC().Format(time.RFC3339),
		Workload: fmt.Sprintf("%d chat requests of %d prompt tokens per arm, kind and round at %.0f/s (Poisson), after %d unmeasured; "+
			"llmsim backends (%d) at time scale %g (a decode step of about 1 ms); non-streamed: stream false, max_tokens 8; "+
			"sse-200: stream true, max_tokens 200, include_usage (200 token chunks, a usage chunk, [DONE])",
			overheadN, overheadPrompt, overheadRate, overheadWarmup, o.Backends, overheadTimeScale),
		Runs: overheadRounds, rounds: map[string]map[string][]OverheadSample{},
	}
	for round := range overheadRounds {
		for i := range OverheadArms {
			arm := OverheadArms[(i+round)%len(OverheadArms)]
			start := time.Now()
			samples, err := overheadArm(ctx, o, arm, round)
			if err != nil {
				return fmt.Errorf("overhead round %d %s: %w", round+1, arm, err)
			}
			if rep.rounds[arm] == nil {
				rep.rounds[arm] = map[string][]OverheadSample{}
			}
			for _, k := range overheadKinds {
				s := samples[k.Name]
				rep.rounds[arm][k.Name] = append(rep.rounds[arm][k.Name], s)
				fmt.Fprintf(o.Log, "overhead round %d %-7s %-12s %d errors  E2E p50 %.2f p99 %.2f ms  CPU envoy %.3f server %.3f ms/req  %.1f msgs/req\n",
					round+1, arm, k.Name, s.Errors, s.E2E.P50, s.E2E.P99, s.EnvoyCPU, s.ServerCPU, s.Messages)
			}
			fmt.Fprintf(o.Log, "overhead round %d %s: %s\n", round+1, arm, time.Since(start).Round(time.Second))
		}
	}
	rep.Arms = medianSamples(rep.rounds)
	lp, err := LargePrompts(ctx, o)
	if err != nil {
		return err
	}
	rep.LargePrompts = lp
	for _, kinds := range rep.Arms {
		for _, m := range kinds {
			m.round()
		}
	}
	fmt.Fprintf(o.Log, "overhead: %s\n", time.Since(began).Round(time.Second))
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(outDir, "overhead.json"), append(b, '\n'), 0o644); err != nil {
		return err
	}
	md := rep.Table()
	fmt.Print(md)
	return os.WriteFile(filepath.Join(outDir, "overhead.md"), []byte(md), 0o644)
}

// medianSamples returns, for each arm and kind, the median of each number
// over the rounds (errors: their sum).
func medianSamples(rounds map[string]map[string][]OverheadSample) map[string]map[string]*OverheadSample {
	out := map[string]map[string]*OverheadSample{}
	for arm, kinds := range rounds {
		out[arm] = map[string]*OverheadSample{}
		for kind, ss := range kinds {
			pick := func(f func(OverheadSample) float64) float64 {
				var v []float64
				for _, s := range ss {
					v = append(v, f(s))
				}
				return median(v)
			}
			m := &OverheadSample{}
			m.E2E.P50 = pick(func(s OverheadSample) float64 { return s.E2E.P50 })
			m.E2E.P99 = pick(func(s OverheadSample) float64 { return s.E2E.P99 })
			m.EnvoyCPU = pick(func(s OverheadSample) float64 { return s.EnvoyCPU })
			m.ServerCPU = pick(func(s OverheadSample) float64 { return s.ServerCPU })
			m.Messages = pick(func(s OverheadSample) float64 { return s.Messages })
			for _, s := range ss {
				m.Errors += s.Errors
			}
			out[arm][kind] = m
		}
	}
	return out
}

// round rounds s's numbers to the microsecond and the hundredth of a
// message, for the report.
func (s *OverheadSample) round() {
	r := func(v *float64, per float64) { *v = math.Round(*v*per) / per }
	r(&s.E2E.P50, 1e3)
	r(&s.E2E.P99, 1e3)
	r(&s.EnvoyCPU, 1e3)
	r(&s.ServerCPU, 1e3)
	r(&s.Messages, 1e2)
}

// OverheadRatios are the ratios the overhead targets are stated in.
type OverheadRatios struct {
	// Non-streamed: tokenlb's server CPU over the floor's, and its added
	// p50 (over Envoy alone) over the floor's.
	ServerCPU, AddedP50 float64
	// SSE-200: tokenlb's server CPU over its own non-streamed, and Envoy's
	// CPU with tokenlb over Envoy alone's.
	SSEServerCPU, SSEEnvoyCPU float64
}

// Ratios computes the ratios from the medians; a missing arm gives 0.
func (r *OverheadReport) Ratios() OverheadRatios { return overheadRatios(r.Arms) }

// roundRatios computes the ratios of each round on its own (the arms of a
// round ran back to back, so these pair them).
func (r *OverheadReport) roundRatios() []OverheadRatios {
	var out []OverheadRatios
	for i := range r.Runs {
		arms := map[string]map[string]*OverheadSample{}
		for arm, kinds := range r.rounds {
			arms[arm] = map[string]*OverheadSample{}
			for kind, ss := range kinds {
				if i < len(ss) {
					arms[arm][kind] = &ss[i]
				}
			}
		}
		out = append(out, overheadRatios(arms))
	}
	return out
}

// overheadRatios computes the ratios from arms' samples.
func overheadRatios(arms map[string]map[string]*OverheadSample) OverheadRatios {
	get := func(arm, kind string) OverheadSample {
		if s := arms[arm][kind]; s != nil {
			return *s
		}
		return OverheadSample{}
	}
	div := func(a, b float64) float64 {
		if b == 0 {
			return 0
		}
		return a / b
	}
	e, f, t := get("envoy", "non-streamed"), get("floor", "non-streamed"), get("tokenlb", "non-streamed")
	return OverheadRatios{
		ServerCPU:    div(t.ServerCPU, f.ServerCPU),
		AddedP50:     div(t.E2E.P50-e.E2E.P50, f.E2E.P50-e.E2E.P50),
		SSEServerCPU: div(get("tokenlb", "sse-200").ServerCPU, t.ServerCPU),
		SSEEnvoyCPU:  div(get("tokenlb", "sse-200").EnvoyCPU, get("envoy", "sse-200").EnvoyCPU),
	}
}

// Table renders the report as markdown: the medians, the ratios against
// the targets, and every round.
func (r *OverheadReport) Table() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Overhead (%s, %s): %s. Medians over %d rounds, the arms in a different order each round.\n\n",
		r.Date, r.Machine, r.Workload, r.Runs)
	b.WriteString("| arm | response | errors | E2E p50 ms | E2E p99 ms | added p50 ms | Envoy CPU ms/req | server CPU ms/req | ext_proc msgs/req |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, arm := range OverheadArms {
		for _, k := range overheadKinds {
			s := r.Arms[arm][k.Name]
			if s == nil {
				continue
			}
			added, server := "", "–"
			if base := r.Arms["envoy"][k.Name]; arm != "envoy" && base != nil {
				added = fmt.Sprintf("%+.2f", s.E2E.P50-base.E2E.P50)
			}
			if arm != "envoy" {
				server = fmt.Sprintf("%.3f", s.ServerCPU)
			}
			fmt.Fprintf(&b, "| %s | %s | %d | %.2f | %.2f | %s | %.3f | %s | %.1f |\n",
				arm, k.Name, s.Errors, s.E2E.P50, s.E2E.P99, added, s.EnvoyCPU, server, s.Messages)
		}
	}
	q, per := r.Ratios(), r.roundRatios()
	verdict := func(v, target float64, f func(OverheadRatios) float64) string {
		if v == 0 {
			return "n/a"
		}
		var rounds []string
		for _, p := range per {
			rounds = append(rounds, fmt.Sprintf("%.2f", f(p)))
		}
		met := "met"
		if v > target {
			met = "missed"
		}
		return fmt.Sprintf("%.3f× (target ≤ %.2f×: %s; round by round %s)", v, target, met, strings.Join(rounds, ", "))
	}
	fmt.Fprintf(&b, "\nAgainst the targets (medians):\n\n"+
		"- non-streamed, tokenlb's server CPU / the floor's: %s\n"+
		"- non-streamed, tokenlb's added p50 / the floor's (added: over Envoy alone): %s\n"+
		"- sse-200, tokenlb's server CPU / its non-streamed: %s\n"+
		"- sse-200, Envoy's CPU with tokenlb / Envoy alone's: %s\n",
		verdict(q.ServerCPU, 1.15, func(q OverheadRatios) float64 { return q.ServerCPU }),
		verdict(q.AddedP50, 1.15, func(q OverheadRatios) float64 { return q.AddedP50 }),
		verdict(q.SSEServerCPU, 1.5, func(q OverheadRatios) float64 { return q.SSEServerCPU }),
		verdict(q.SSEEnvoyCPU, 1.2, func(q OverheadRatios) float64 { return q.SSEEnvoyCPU }))
	if e, f := r.Arms["envoy"]["sse-200"], r.Arms["floor"]["sse-200"]; e != nil && f != nil && e.EnvoyCPU > 0 {
		fmt.Fprintf(&b, "- for comparison, sse-200, Envoy's CPU with the floor / Envoy alone's: %.2f×\n", f.EnvoyCPU/e.EnvoyCPU)
	}
	if f, t := r.Arms["floor"]["sse-200"], r.Arms["tokenlb"]["sse-200"]; f != nil && t != nil && f.ServerCPU > 0 && f.EnvoyCPU > 0 {
		fmt.Fprintf(&b, "- for comparison, sse-200, tokenlb / the floor: server CPU %.2f×, Envoy CPU %.2f×\n",
			t.ServerCPU/f.ServerCPU, t.EnvoyCPU/f.EnvoyCPU)
	}
	b.WriteString("\nEvery round (E2E p50 / p99 ms, Envoy CPU, server CPU ms/req, msgs/req):\n\n| arm | response | rounds |\n|---|---|---|\n")
	for _, arm := range OverheadArms {
		for _, k := range overheadKinds {
			var cells []string
			for _, s := range r.rounds[arm][k.Name] {
				cells = append(cells, fmt.Sprintf("%.2f / %.2f, %.3f, %.3f, %.1f", s.E2E.P50, s.E2E.P99, s.EnvoyCPU, s.ServerCPU, s.Messages))
			}
			if len(cells) > 0 {
				fmt.Fprintf(&b, "| %s | %s | %s |\n", arm, k.Name, strings.Join(cells, "; "))
			}
		}
	}
	b.WriteString(largePromptTable(r.LargePrompts))
	return b.String()
}

// overheadArm starts the backends, Envoy and the arm's ext_proc server,
// runs each kind of response in turn on them, and returns each kind's
// sample.
func overheadArm(ctx context.Context, o Options, arm string, round int) (map[string]OverheadSample, error) {
	dir, done, err := runDir(o.LogDir, "overhead-"+arm)
	if err != nil {
		return nil, err
	}
	defer done()
	g := &proc.Group{Dir: dir}
	defer g.StopAll()
	b, err := startBackends(ctx, g, o)
	if err != nil {
		return nil, err
	}
	defer b.stop()
	config, server := "envoy.yaml", arm
	eo := envoycfg.Options{Backends: b.hosts}
	switch arm {
	case "envoy":
		config, server, eo.Policy = "envoy-override-host.yaml", "", "ROUND_ROBIN"
	case "floor":
		if eo.TokenlbPort, err = startFloor(ctx, g, b.hosts); err != nil {
			return nil, err
		}
	case "tokenlb", "tokenlb-to-end":
		server = "tokenlb"
		eo.WithoutEnd = arm == "tokenlb-to-end"
		if eo.TokenlbPort, _, err = startTokenlb(ctx, g, o, "tokenlb", Variants["tokenlb"], b.hosts); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("bench: unknown overhead arm %q", arm)
	}
	eo, err = g.StartEnvoy(ctx, o.Envoy, filepath.Join(o.DeployDir, config), eo, "--concurrency", "1", "-l", "error")
	if err != nil {
		return nil, err
	}
	url := fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", eo.ListenPort)
	statsURL := fmt.Sprintf("http://127.0.0.1:%d/stats?filter=ext_proc", eo.AdminPort)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1024}}
	defer client.CloseIdleConnections()

	out := map[string]OverheadSample{}
	for _, k := range overheadKinds {
		for i := range overheadWarmup {
			sendOverhead(ctx, client, url, overheadRequest(uint64(1_000_000+i)), k)
		}
		time.Sleep(overheadSettle)
		envoyPID, serverPID := g.PID("envoy"), 0
		if server != "" {
			serverPID = g.PID(server)
		}
		msgs0, err := extProcMessages(statsURL)
		if err != nil {
			return nil, err
		}
		e0, s0 := cpuSeconds(envoyPID), cpuSeconds(serverPID)
		e2es, errs := overheadLoad(ctx, client, url, k, uint64(round))
		// Let the observer stream's last messages reach the server.
		time.Sleep(overheadSettle)
		e1, s1 := cpuSeconds(envoyPID), cpuSeconds(serverPID)
		msgs1, err := extProcMessages(statsURL)
		if err != nil {
			return nil, err
		}
		if err := g.Exited(); err != nil {
			return nil, err
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		st := summarize(e2es)
		s := OverheadSample{EnvoyCPU: 1000 * (e1 - e0) / overheadN, ServerCPU: 1000 * (s1 - s0) / overheadN,
			Messages: float64(msgs1-msgs0) / overheadN, Errors: errs}
		s.E2E.P50, s.E2E.P99 = st.P50, st.P99
		if serverPID == 0 {
			s.ServerCPU = 0
		}
		out[k.Name] = s
	}
	return out, nil
}

// overheadRequest is the i-th request: a 1,000-token chat prompt of its own.
func overheadRequest(i uint64) Request {
	return Request{Messages: []Message{{"user", Text(rngFor(i), overheadPrompt)}}}
}

// overheadLoad sends overheadN requests of kind k at overheadRate (Poisson
// arrivals, seeded by round) and returns the latencies of those that
// succeeded, in ms, and the number that failed.
func overheadLoad(ctx context.Context, client *http.Client, url string, k overheadKind, round uint64) ([]float64, int) {
	rng := rand.New(rand.NewPCG(round+1, 0x0e4d))
	var (
		mu   sync.Mutex
		e2es []float64
		errs int
		wg   sync.WaitGroup
	)
	start := time.Now()
	at := time.Duration(0)
	for i := range overheadN {
		at += time.Duration(rng.ExpFloat64() / overheadRate * float64(time.Second))
		if d := time.Until(start.Add(at)); d > 0 {
			select {
			case <-ctx.Done():
			case <-time.After(d):
			}
		}
		r := overheadRequest(uint64(i))
		wg.Go(func() {
			d, err := sendOverhead(ctx, client, url, r, k)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs++
				return
			}
			e2es = append(e2es, d.Seconds()*1000)
		})
	}
	wg.Wait()
	return e2es, errs
}

// sendOverhead sends one request of kind k and returns how long its whole
// response took.
func sendOverhead(ctx context.Context, client *http.Client, url string, r Request, k overheadKind) (time.Duration, error) {
	body := map[string]any{"model": "llmsim", "stream": k.Stream, "max_tokens": k.MaxTokens, "messages": r.Messages}
	if k.Stream {
		body["stream_options"] = map[string]any{"include_usage": true}
	}
	b, _ := json.Marshal(body)
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if k.Stream {
		req, _ := http.NewRequestWithContext(ctx, "POST", url, bytes.NewReader(b))
		req.Header.Set("content-type", "application/json")
		s := sendRequest(client, req)
		return s.e2e, s.err
	}
	return postWhole(ctx, client, url, b)
}

// postWhole posts a non-streamed request and returns how long its whole
// answer took, or why it was not a 200 with usage.
func postWhole(ctx context.Context, client *http.Client, url string, body []byte) (time.Duration, error) {
	req, _ := http.NewRequestWithContext(ctx, "POST", url, bytes.NewReader(body))
	req.Header.Set("content-type", "application/json")
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	rb, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	if resp.StatusCode != 200 || !bytes.Contains(rb, []byte(`"usage"`)) {
		return 0, fmt.Errorf("status %d: %.200s", resp.StatusCode, rb)
	}
	return time.Since(start), nil
}

// extProcMessages reads Envoy's ext_proc message counters from its admin
// /stats at url.
func extProcMessages(url string) (int64, error) {
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get(url)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return 0, fmt.Errorf("%s: status %d", url, resp.StatusCode)
	}
	return sumExtProcMessages(resp.Body)
}

// sumExtProcMessages sums, in Envoy's /stats text ("name: value" a line),
// every ext_proc filter's stream_msgs_sent and stream_msgs_received: the
// gRPC messages of both directions.
func sumExtProcMessages(r io.Reader) (int64, error) {
	var total int64
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), ": ")
		if !ok || !strings.Contains(name, "ext_proc") ||
			!(strings.HasSuffix(name, ".stream_msgs_sent") || strings.HasSuffix(name, ".stream_msgs_received")) {
			continue
		}
		n, err := strconv.ParseInt(strings.TrimSpace(value), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("envoy stat %s: %w", name, err)
		}
		total += n
	}
	return total, sc.Err()
}

// machine describes this machine and the Envoy binary, for the report.
func machine(envoy string) string {
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if name, ok := strings.CutPrefix(line, "model name"); ok {
				cpu = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(name), ":"))
				break
			}
		}
	}
	m := fmt.Sprintf("%d × %s, %s/%s", runtime.NumCPU(), cpu, runtime.GOOS, runtime.GOARCH)
	if b, err := exec.Command(envoy, "--version").Output(); err == nil {
		out := string(b)
		if i := strings.Index(out, "/1."); i >= 0 {
			v := out[i+1:]
			if j := strings.IndexByte(v, '/'); j >= 0 {
				v = v[:j]
			}
			m += ", Envoy " + v
		}
	}
	return m
}

// cpuSeconds returns a process's CPU time (user + system, every thread) in
// seconds, 0 for pid 0. It sums the threads' run time from schedstat (ns)
// when it can, as /proc/<pid>/stat counts in 10 ms ticks, which is coarse
// against a few hundred ms a measurement; else /proc/<pid>/stat.
func cpuSeconds(pid int) float64 {
	if pid == 0 {
		return 0
	}
	if s, ok := schedstatSeconds(pid); ok {
		return s
	}
	return statSeconds(pid)
}

// schedstatSeconds sums the run time of pid's threads from
// /proc/<pid>/task/*/schedstat.
func schedstatSeconds(pid int) (float64, bool) {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil || len(tasks) == 0 {
		return 0, false
	}
	var ns int64
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/schedstat", pid, t.Name()))
		if err != nil {
			continue // the thread has gone
		}
		f := strings.Fields(string(b))
		if len(f) == 0 {
			return 0, false
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, false
		}
		ns += n
	}
	return float64(ns) / 1e9, true
}

// statSeconds reads a process's user + system CPU time from /proc.
func statSeconds(pid int) float64 {
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

// commandLine is args as a report records them: a path inside the working
// folder relative to it, a program's path elsewhere (the Envoy binary, an
// output folder) by its base name, so that a report names no machine's
// folders.
func commandLine(args []string) string {
	wd, _ := os.Getwd()
	out := make([]string, len(args))
	for i, a := range args {
		out[i] = a
		if !filepath.IsAbs(a) {
			continue
		}
		if rel, err := filepath.Rel(wd, a); err == nil && !strings.HasPrefix(rel, "..") {
			out[i] = rel
		} else {
			out[i] = filepath.Base(a)
		}
	}
	return strings.Join(out, " ")
}
