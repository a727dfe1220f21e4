package backend

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/tokenlb/tokenlb/picker"
)

// Discovery configures model discovery: a GET of Path (an OpenAI model
// list) on each host every Interval, sooner after a failed read, and at once
// when the host passes its health checks again. A host whose list was read
// keeps it until the next read succeeds; until one is read, the picker sends
// it a model only when no healthy host is known to serve it.
type Discovery struct {
	Path     string
	Interval time.Duration // 0: off
	Timeout  time.Duration
	// Skip lists hosts not to ask: their models are configured.
	Skip []string
}

// Scrape configures reading each host's engine metrics: a GET of Path in
// Prometheus text format every Interval. A failed read forgets the last one.
type Scrape struct {
	Path     string
	Interval time.Duration // 0: off
	Timeout  time.Duration
}

// DefaultModels fills the zero fields of enabled model discovery.
var DefaultModels = Discovery{Path: "/v1/models", Interval: 30 * time.Second, Timeout: 2 * time.Second}

// DefaultMetrics fills the zero fields of enabled engine metrics reads.
var DefaultMetrics = Scrape{Path: "/metrics", Interval: time.Second, Timeout: 500 * time.Millisecond}

// withDefaults returns d with its zero fields taken from DefaultModels, if
// discovery is on.
func (d Discovery) withDefaults() Discovery {
	if d.Interval <= 0 {
		return d
	}
	d.Path = cmp.Or(d.Path, DefaultModels.Path)
	d.Timeout = cmp.Or(d.Timeout, DefaultModels.Timeout)
	return d
}

// withDefaults returns sc with its zero fields taken from DefaultMetrics, if
// scraping is on.
func (sc Scrape) withDefaults() Scrape {
	if sc.Interval <= 0 {
		return sc
	}
	sc.Path = cmp.Or(sc.Path, DefaultMetrics.Path)
	sc.Timeout = cmp.Or(sc.Timeout, DefaultMetrics.Timeout)
	return sc
}

// modelsRetryInterval is how soon a failed model list read is tried again.
const modelsRetryInterval = 5 * time.Second

// discover reads the models addr serves and reports whether it could. The
// first failure after a success (or at start) is logged as a warning: until
// a list is read, the host gets requests only for models no healthy host is
// known to serve.
func (w *Watcher) discover(ctx context.Context, addr string) bool {
	models, err := w.readModels(ctx, addr)
	if ctx.Err() != nil {
		return true
	}
	w.mu.Lock()
	s := w.hosts[addr]
	if s == nil {
		w.mu.Unlock()
		return true // removed meanwhile
	}
	first := !s.modelsFailed
	s.modelsFailed = err != nil
	w.mu.Unlock()
	if err != nil {
		w.m.reads.WithLabelValues(addr, "models", "failed").Inc()
		if first {
			w.log.Warn("model list not read; retrying", "host", addr, "err", err, "every", min(w.opts.Models.Interval, modelsRetryInterval))
		} else {
			w.log.Debug("model list not read", "host", addr, "err", err)
		}
		return false // keep what was known
	}
	w.m.reads.WithLabelValues(addr, "models", "ok").Inc()
	w.warnIfRefused("models", addr, w.target.SetModels(addr, models))
	return true
}

// readModels GETs addr's model list and returns the ids in it.
func (w *Watcher) readModels(ctx context.Context, addr string) ([]string, error) {
	var list struct {
		Data []struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	d := w.opts.Models
	err := w.fetch(ctx, addr, d.Path, d.Timeout, func(body io.Reader) error {
		if err := json.NewDecoder(body).Decode(&list); err != nil {
			return err
		}
		if list.Data == nil {
			return errors.New(`no "data" list`)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	models := make([]string, 0, len(list.Data))
	for _, m := range list.Data {
		if m.ID != "" {
			models = append(models, m.ID)
		}
	}
	return models, nil
}

// Engine metrics read, by engine. Counts are summed over label sets (one
// per model served), usage is the highest of them.
var (
	runningNames = []string{"vllm:num_requests_running", "sglang:num_running_reqs"}
	waitingNames = []string{"vllm:num_requests_waiting", "sglang:num_queue_reqs"}
	usageNames   = []string{"vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage"}
)

// scrape reads addr's engine metrics.
func (w *Watcher) scrape(ctx context.Context, addr string) {
	r, err := w.readMetrics(ctx, addr)
	if ctx.Err() != nil {
		return
	}
	if err != nil {
		w.m.reads.WithLabelValues(addr, "metrics", "failed").Inc()
		w.log.Debug("engine metrics not read", "host", addr, "err", err)
		w.warnIfRefused("remote", addr, w.target.SetRemote(addr, picker.Remote{}))
		return
	}
	w.m.reads.WithLabelValues(addr, "metrics", "ok").Inc()
	w.warnIfRefused("remote", addr, w.target.SetRemote(addr, r))
}

// readMetrics GETs addr's engine metrics page and returns its queue, as of
// when the read began.
func (w *Watcher) readMetrics(ctx context.Context, addr string) (picker.Remote, error) {
	sc := w.opts.Metrics
	at := w.opts.Now()
	var r picker.Remote
	err := w.fetch(ctx, addr, sc.Path, sc.Timeout, func(body io.Reader) error {
		var found bool
		var err error
		if r, found, err = parseMetrics(body); err == nil && !found {
			err = errors.New("no vLLM or SGLang queue metrics")
		}
		return err
	})
	if err != nil {
		return picker.Remote{}, err
	}
	r.At = at
	return r, nil
}

// parseMetrics reads the engine's queue from a Prometheus text page; found
// reports whether it had a running or waiting count.
func parseMetrics(r io.Reader) (rem picker.Remote, found bool, err error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		name, rest, ok := splitSample(line)
		if !ok {
			continue
		}
		var into func(float64)
		switch {
		case slices.Contains(runningNames, name):
			into = func(v float64) { rem.Running += int(v + 0.5); found = true }
		case slices.Contains(waitingNames, name):
			into = func(v float64) { rem.Waiting += int(v + 0.5); found = true }
		case slices.Contains(usageNames, name):
			into = func(v float64) { rem.KVCacheUsage = max(rem.KVCacheUsage, min(1, v)) }
		default:
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(fields[0], 64)
		if err != nil || v != v || v < 0 || v > 1e9 {
			continue
		}
		into(v)
	}
	return rem, found, sc.Err()
}

// splitSample splits a sample line into its metric name and what follows
// the labels.
func splitSample(line string) (name, rest string, ok bool) {
	i := strings.IndexAny(line, "{ ")
	if i <= 0 {
		return "", "", false
	}
	name, rest = line[:i], line[i:]
	if rest[0] == '{' {
		// Label values may hold '}' inside quotes.
		inQuote, esc := false, false
		for j := 1; j < len(rest); j++ {
			c := rest[j]
			switch {
			case esc:
				esc = false
			case c == '\\':
				esc = true
			case c == '"':
				inQuote = !inQuote
			case c == '}' && !inQuote:
				return name, rest[j+1:], true
			}
		}
		return "", "", false
	}
	return name, rest, true
}
