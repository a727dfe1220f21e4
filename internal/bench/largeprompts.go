package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/tokenlb/tokenlb/internal/envoycfg"
	"github.com/tokenlb/tokenlb/internal/proc"
	"github.com/tokenlb/tokenlb/internal/sim"
)

// Large prompts (issue 19): after the overhead run's arms, the added latency
// and CPU at prompts of 4k, 32k and 200k tokens, with the routing filter's
// request body BUFFERED (deploy/envoy.yaml as is) and FULL_DUPLEX_STREAMED
// (envoycfg Duplex), and whether tokenlb counted every prompt exactly (its
// tokenlb_tokenizer_estimated_requests_total, read before and after). One
// round, non-streamed answers of 8 tokens, at a fixed rate a size.
//
// The backends are llmsim with a KV cache and a step budget large enough
// for a 200k-token prompt and prefill next to free, so that the backends'
// time does not drown what the proxies add.

// largePromptSize is one prompt size and the rate it is sent at.
type largePromptSize struct {
	Tokens int     // words of the bench's vocabulary: about as many tokens
	Rate   float64 // requests/s, Poisson arrivals
}

var largePromptSizes = []largePromptSize{{4_000, 20}, {32_000, 10}, {200_000, 5}}

// largePromptModes are the routing filter's request body modes.
var largePromptModes = []string{"buffered", "duplex"}

// largePromptArms are the arms measured; envoy is the baseline (no ext_proc
// filter, so it has no body mode of its own).
var largePromptArms = []string{"envoy", "floor", "tokenlb"}

// largePromptModesOf are the body modes arm is measured in. The floor
// (floor.go) answers a request body with an empty BodyResponse, which
// FULL_DUPLEX_STREAMED does not accept (the server must send the body back
// as StreamedBodyResponse chunks): every request fails, so it runs buffered
// only.
func largePromptModesOf(arm string) []string {
	switch arm {
	case "envoy":
		return []string{"-"}
	case "floor":
		return []string{"buffered"}
	}
	return largePromptModes
}

const (
	largePromptN      = 60 // measured requests per arm, mode and size
	largePromptWarmup = 3
	largePromptMax    = 8 // max_tokens
)

// LargePromptRow is one row of overhead.json's large_prompts.
type LargePromptRow struct {
	Arm          string `json:"arm"`
	Mode         string `json:"mode"`
	PromptTokens int    `json:"prompt_tokens"`
	Errors       int    `json:"errors"`
	E2E          struct {
		P50 float64 `json:"p50"`
		P99 float64 `json:"p99"`
	} `json:"e2e_ms"`
	// Added is E2E over the envoy arm's at the same size (0 for envoy).
	Added struct {
		P50 float64 `json:"p50"`
		P99 float64 `json:"p99"`
	} `json:"added_ms"`
	EnvoyCPU  float64 `json:"envoy_cpu_ms_per_request"`
	ServerCPU float64 `json:"server_cpu_ms_per_request"`
	// Estimated is how many of the measured requests tokenlb counted only
	// partly (estimated), by reason; nil for the arms without tokenlb.
	Estimated         *int64           `json:"estimated_requests"`
	EstimatedByReason map[string]int64 `json:"estimated_by_reason,omitempty"`
	// CountMs bounds tokenlb's own time to parse and count a request (its
	// tokenlb_tokenize_duration_seconds histogram over the measured
	// requests): the upper bound of the bucket that holds the quantile, in
	// ms; nil for the arms without tokenlb. What tokenlb adds on the
	// request path beyond what the floor adds (the body's transfer).
	CountMs *struct {
		P50 float64 `json:"p50_at_most"`
		P99 float64 `json:"p99_at_most"`
	} `json:"count_ms,omitempty"`
}

// largePromptBodies are each size's request bodies: warmup then measured,
// every prompt of its own (tokenlb caches repeated texts).
func largePromptBodies(size int) [][]byte {
	var out [][]byte
	for i := range largePromptWarmup + largePromptN {
		rng := rngFor(uint64(size)*1000 + uint64(i))
		b, _ := json.Marshal(map[string]any{"model": "llmsim", "stream": false, "max_tokens": largePromptMax,
			"messages": []Message{{"user", Text(rng, size)}}})
		out = append(out, b)
	}
	return out
}

// LargePrompts runs the large-prompt rows.
func LargePrompts(ctx context.Context, o Options) ([]LargePromptRow, error) {
	began := time.Now()
	bodies := map[int][][]byte{}
	for _, s := range largePromptSizes {
		bodies[s.Tokens] = largePromptBodies(s.Tokens)
	}
	var rows []LargePromptRow
	for _, arm := range largePromptArms {
		for _, mode := range largePromptModesOf(arm) {
			start := time.Now()
			r, err := largePromptArm(ctx, o, arm, mode, bodies)
			if err != nil {
				return nil, fmt.Errorf("large prompts %s %s: %w", arm, mode, err)
			}
			for _, row := range r {
				est := "–"
				if row.Estimated != nil {
					est = fmt.Sprint(*row.Estimated, row.EstimatedByReason)
				}
				fmt.Fprintf(o.Log, "large prompts %-7s %-8s %6d tokens  %d errors  E2E p50 %.2f p99 %.2f ms  CPU envoy %.3f server %.3f ms/req  estimated %s\n",
					arm, mode, row.PromptTokens, row.Errors, row.E2E.P50, row.E2E.P99, row.EnvoyCPU, row.ServerCPU, est)
			}
			fmt.Fprintf(o.Log, "large prompts %s %s: %s\n", arm, mode, time.Since(start).Round(time.Second))
			rows = append(rows, r...)
		}
	}
	addLargePromptBaseline(rows)
	for i := range rows {
		rows[i].round()
	}
	fmt.Fprintf(o.Log, "large prompts: %s\n", time.Since(began).Round(time.Second))
	return rows, nil
}

// addLargePromptBaseline sets every row's added latency: its E2E over the
// envoy arm's at the same prompt size.
func addLargePromptBaseline(rows []LargePromptRow) {
	base := map[int]LargePromptRow{}
	for _, r := range rows {
		if r.Arm == "envoy" {
			base[r.PromptTokens] = r
		}
	}
	for i := range rows {
		b, ok := base[rows[i].PromptTokens]
		if !ok || rows[i].Arm == "envoy" {
			continue
		}
		rows[i].Added.P50 = rows[i].E2E.P50 - b.E2E.P50
		rows[i].Added.P99 = rows[i].E2E.P99 - b.E2E.P99
	}
}

func (r *LargePromptRow) round() {
	f := func(v *float64) { *v = math.Round(*v*1e3) / 1e3 }
	f(&r.E2E.P50)
	f(&r.E2E.P99)
	f(&r.Added.P50)
	f(&r.Added.P99)
	f(&r.EnvoyCPU)
	f(&r.ServerCPU)
}

// largePromptBackends starts o.Backends llmsim servers that take a
// 200k-token prompt (KV cache and step budget) and prefill at next to no
// cost.
func largePromptBackends(ctx context.Context, o Options) (*backends, error) {
	return startSims(ctx, o, func(cfg *sim.Config) {
		cfg.KVBlocks = 1 << 17 // 2M tokens of 16
		cfg.MaxNumBatchedTokens = 1 << 18
		cfg.PrefillTokenCost = time.Nanosecond
	})
}

// largePromptArm starts the backends, Envoy (in mode) and the arm's
// ext_proc server, and runs each size on them.
func largePromptArm(ctx context.Context, o Options, arm, mode string, bodies map[int][][]byte) ([]LargePromptRow, error) {
	dir, done, err := runDir(o.LogDir, "large-"+arm)
	if err != nil {
		return nil, err
	}
	defer done()
	g := &proc.Group{Dir: dir}
	defer g.StopAll()
	b, err := largePromptBackends(ctx, o)
	if err != nil {
		return nil, err
	}
	defer b.stop()
	config, server, admin := "envoy.yaml", arm, ""
	eo := envoycfg.Options{Backends: b.hosts, Duplex: mode == "duplex"}
	switch arm {
	case "envoy":
		config, server, eo.Policy = "envoy-override-host.yaml", "", "ROUND_ROBIN"
	case "floor":
		if eo.TokenlbPort, err = startFloor(ctx, g, b.hosts); err != nil {
			return nil, err
		}
	case "tokenlb":
		var adminPort int
		if eo.TokenlbPort, adminPort, err = startTokenlb(ctx, g, o, "tokenlb", Variants["tokenlb"], b.hosts); err != nil {
			return nil, err
		}
		admin = fmt.Sprintf("http://127.0.0.1:%d/metrics", adminPort)
	default:
		return nil, fmt.Errorf("bench: unknown large-prompt arm %q", arm)
	}
	eo, err = g.StartEnvoy(ctx, o.Envoy, filepath.Join(o.DeployDir, config), eo, "--concurrency", "1", "-l", "error")
	if err != nil {
		return nil, err
	}
	url := fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", eo.ListenPort)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1024}}
	defer client.CloseIdleConnections()

	var rows []LargePromptRow
	for si, size := range largePromptSizes {
		bs := bodies[size.Tokens]
		for _, body := range bs[:largePromptWarmup] {
			sendLargePrompt(ctx, client, url, body)
		}
		time.Sleep(overheadSettle)
		envoyPID, serverPID := g.PID("envoy"), 0
		if server != "" {
			serverPID = g.PID(server)
		}
		var before tokenlbCounts
		if admin != "" {
			if before, err = readTokenlbCounts(admin); err != nil {
				return nil, err
			}
		}
		e0, s0 := cpuSeconds(envoyPID), cpuSeconds(serverPID)
		e2es, errs, firstErr := largePromptLoad(ctx, client, url, bs[largePromptWarmup:], size.Rate, uint64(si))
		if firstErr != nil {
			fmt.Fprintf(o.Log, "large prompts %s %s %d tokens: %d errors, the first: %v\n", arm, mode, size.Tokens, errs, firstErr)
		}
		time.Sleep(overheadSettle)
		e1, s1 := cpuSeconds(envoyPID), cpuSeconds(serverPID)
		row := LargePromptRow{Arm: arm, Mode: mode, PromptTokens: size.Tokens, Errors: errs,
			EnvoyCPU: 1000 * (e1 - e0) / largePromptN, ServerCPU: 1000 * (s1 - s0) / largePromptN}
		if admin != "" {
			if err := row.setTokenlbCounts(admin, before); err != nil {
				return nil, err
			}
		}
		if err := errors.Join(g.Exited(), ctx.Err()); err != nil {
			return nil, err
		}
		st := summarize(e2es)
		row.E2E.P50, row.E2E.P99 = st.P50, st.P99
		rows = append(rows, row)
	}
	return rows, nil
}

// largePromptLoad sends bodies at rate (Poisson arrivals, seeded) and
// returns the latencies of those that succeeded, in ms, the number that
// failed and the first error.
func largePromptLoad(ctx context.Context, client *http.Client, url string, bodies [][]byte, rate float64, seed uint64) ([]float64, int, error) {
	rng := rand.New(rand.NewPCG(seed+1, 0x1a9e))
	var (
		mu   sync.Mutex
		e2es []float64
		errs int
		wg   sync.WaitGroup
		err1 error
	)
	start := time.Now()
	at := time.Duration(0)
	for _, body := range bodies {
		at += time.Duration(rng.ExpFloat64() / rate * float64(time.Second))
		if d := time.Until(start.Add(at)); d > 0 {
			select {
			case <-ctx.Done():
			case <-time.After(d):
			}
		}
		wg.Go(func() {
			d, err := sendLargePrompt(ctx, client, url, body)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				if errs == 0 {
					err1 = err
				}
				errs++
				return
			}
			e2es = append(e2es, d.Seconds()*1000)
		})
	}
	wg.Wait()
	return e2es, errs, err1
}

// sendLargePrompt sends one request body and returns how long its whole
// response took.
func sendLargePrompt(ctx context.Context, client *http.Client, url string, body []byte) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	return postWhole(ctx, client, url, body)
}

// estimatedRequests reads tokenlb's tokenlb_tokenizer_estimated_requests_total
// from its admin /metrics at url, by reason.
func estimatedRequests(url string) (map[string]int64, error) {
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return nil, fmt.Errorf("%s: status %d", url, resp.StatusCode)
	}
	return parseEstimated(resp.Body)
}

// parseEstimated reads, from Prometheus text, every
// tokenlb_tokenizer_estimated_requests_total sample by its reason label.
func parseEstimated(r io.Reader) (map[string]int64, error) {
	const name = "tokenlb_tokenizer_estimated_requests_total"
	out := map[string]int64{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		rest, ok := strings.CutPrefix(line, name)
		if !ok || (rest != "" && rest[0] != '{' && rest[0] != ' ') {
			continue
		}
		reason := ""
		if labels, after, ok := strings.Cut(rest, "}"); ok && strings.HasPrefix(labels, "{") {
			for _, kv := range strings.Split(labels[1:], ",") {
				if k, v, ok := strings.Cut(kv, "="); ok && strings.TrimSpace(k) == "reason" {
					reason = strings.Trim(strings.TrimSpace(v), `"`)
				}
			}
			rest = after
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			return nil, fmt.Errorf("metric line %q: no value", line)
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			return nil, fmt.Errorf("metric line %q: %w", line, err)
		}
		out[reason] += int64(v)
	}
	return out, sc.Err()
}

// largePromptTable renders the rows as markdown.
func largePromptTable(rows []LargePromptRow) string {
	if len(rows) == 0 {
		return ""
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\nLarge prompts (issue 19): %d non-streamed requests (max_tokens %d) per arm, body mode and prompt size, after %d unmeasured, "+
		"each prompt of its own (words of the bench's vocabulary, about one token each); Poisson arrivals at ",
		largePromptN, largePromptMax, largePromptWarmup)
	var rates []string
	for _, s := range largePromptSizes {
		rates = append(rates, fmt.Sprintf("%g/s for %dk", s.Rate, s.Tokens/1000))
	}
	b.WriteString(strings.Join(rates, ", "))
	b.WriteString("; llmsim backends with room for a 200k-token prompt and prefill next to free. " +
		"buffered: deploy/envoy.yaml as is; duplex: the routing filter's request body FULL_DUPLEX_STREAMED. " +
		"Envoy alone has no ext_proc filter and so no body mode: it is the baseline of both. " +
		"The floor runs buffered only: its empty answer to a request body is not valid in FULL_DUPLEX_STREAMED " +
		"(the server has to send the body back as StreamedBodyResponse chunks), so every duplex request through it fails. " +
		"One round only (not medians): read these as rough numbers. " +
		"Estimated: requests tokenlb counted only partly (tokenlb_tokenizer_estimated_requests_total, by reason). " +
		"Parse and count: tokenlb's own time from the whole body to its count (tokenlb_tokenize_duration_seconds over the measured requests), " +
		"as the upper bound of the histogram bucket that holds the quantile: what tokenlb adds to the request beyond the body's transfer, which the floor pays too.\n\n")
	b.WriteString("| arm | mode | prompt tokens | errors | E2E p50 ms | E2E p99 ms | added p50 ms | added p99 ms | Envoy CPU ms/req | server CPU ms/req | estimated | tokenlb parse and count p50 / p99 ms, at most |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range rows {
		added50, added99, server, est, count := "", "", "–", "–", "–"
		if c := r.CountMs; c != nil {
			count = fmt.Sprintf("%.3g / %.3g", c.P50, c.P99)
		}
		if r.Arm != "envoy" {
			added50, added99 = fmt.Sprintf("%+.2f", r.Added.P50), fmt.Sprintf("%+.2f", r.Added.P99)
			server = fmt.Sprintf("%.3f", r.ServerCPU)
		}
		if r.Estimated != nil {
			est = fmt.Sprintf("%d / %d", *r.Estimated, largePromptN)
			var reasons []string
			for _, reason := range []string{"size", "time"} {
				if n := r.EstimatedByReason[reason]; n > 0 {
					reasons = append(reasons, fmt.Sprintf("%s %d", reason, n))
				}
			}
			if len(reasons) > 0 {
				est += " (" + strings.Join(reasons, ", ") + ")"
			}
		}
		fmt.Fprintf(&b, "| %s | %s | %d | %d | %.2f | %.2f | %s | %s | %.3f | %s | %s | %s |\n",
			r.Arm, r.Mode, r.PromptTokens, r.Errors, r.E2E.P50, r.E2E.P99, added50, added99, r.EnvoyCPU, server, est, count)
	}
	return b.String()
}

// setEstimated records how many requests tokenlb estimated (by reason)
// since it counted before, from its metrics at admin.
func (row *LargePromptRow) setEstimated(admin string, before map[string]int64) error {
	after, err := estimatedRequests(admin)
	if err != nil {
		return err
	}
	row.EstimatedByReason = map[string]int64{}
	var total int64
	for reason, n := range after {
		if d := n - before[reason]; d != 0 {
			row.EstimatedByReason[reason] = d
			total += d
		}
	}
	row.Estimated = &total
	return nil
}

// bucket is one cumulative bucket of a Prometheus histogram.
type bucket struct {
	le    float64 // upper bound, seconds
	count float64 // observations at most le
}

// countBuckets reads tokenlb's tokenlb_tokenize_duration_seconds buckets
// from its admin /metrics at url.
func countBuckets(url string) ([]bucket, error) {
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	return parseBuckets(resp.Body, "tokenlb_tokenize_duration_seconds")
}

// parseBuckets reads, from Prometheus text, histogram name's cumulative
// buckets in order (+Inf last).
func parseBuckets(r io.Reader, name string) ([]bucket, error) {
	var out []bucket
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), name+`_bucket{le="`)
		if !ok {
			continue
		}
		le, value, ok := strings.Cut(rest, `"} `)
		if !ok {
			return nil, fmt.Errorf("metric line %q: no value", sc.Text())
		}
		b, err := strconv.ParseFloat(le, 64) // "+Inf" parses
		if err != nil {
			return nil, fmt.Errorf("metric line %q: %w", sc.Text(), err)
		}
		n, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
		if err != nil {
			return nil, fmt.Errorf("metric line %q: %w", sc.Text(), err)
		}
		out = append(out, bucket{b, n})
	}
	return out, sc.Err()
}

// atMost returns the upper bound, in ms, of the first bucket holding
// quantile q of the observations between before and after (the same
// histogram read twice).
func atMost(before, after []bucket, q float64) float64 {
	if len(after) == 0 || len(before) != len(after) {
		return math.NaN()
	}
	total := after[len(after)-1].count - before[len(before)-1].count
	for i := range after {
		if after[i].count-before[i].count >= q*total {
			return after[i].le * 1000
		}
	}
	return math.Inf(1)
}

// tokenlbCounts is what a large-prompt row reads from tokenlb's metrics
// before and after its requests.
type tokenlbCounts struct {
	estimated map[string]int64
	count     []bucket
}

func readTokenlbCounts(admin string) (c tokenlbCounts, err error) {
	if c.estimated, err = estimatedRequests(admin); err != nil {
		return c, err
	}
	c.count, err = countBuckets(admin)
	return c, err
}

// setTokenlbCounts records how many requests tokenlb estimated and the
// bounds of its parse-and-count time since before, from its metrics at
// admin.
func (row *LargePromptRow) setTokenlbCounts(admin string, before tokenlbCounts) error {
	if err := row.setEstimated(admin, before.estimated); err != nil {
		return err
	}
	after, err := countBuckets(admin)
	if err != nil {
		return err
	}
	row.CountMs = &struct {
		P50 float64 `json:"p50_at_most"`
		P99 float64 `json:"p99_at_most"`
	}{atMost(before.count, after, 0.5), atMost(before.count, after, 0.99)}
	return nil
}
