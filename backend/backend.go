// Package backend watches tokenlb's backend hosts from outside the request
// path and tells the picker what it learns: whether each host is healthy
// (active checks, and passive ejection on failed responses), which models
// it serves (GET /v1/models), and how many requests its engine holds from
// every router in front of it (vLLM's or SGLang's Prometheus metrics).
//
// Each source can be switched off on its own; with all off, a Watcher only
// passes responses' statuses through to nobody.
package backend

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/tokenlb/tokenlb/picker"
)

// Target receives what a Watcher learns; *picker.Picker is one.
type Target interface {
	SetHealth(addr string, h picker.Health) error
	SetModels(addr string, models []string) error
	SetRemote(addr string, r picker.Remote) error
}

// Options configure a Watcher. Zero intervals and thresholds switch a
// source off.
type Options struct {
	Health  HealthCheck
	Outlier Outlier
	Models  Discovery
	Metrics Scrape
	// Client makes every request; nil means a plain client. Each request
	// is bounded by its source's Timeout.
	Client *http.Client
	Logger *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// After schedules f after d (readmission after an ejection); nil means
	// time.AfterFunc.
	After func(d time.Duration, f func()) func() bool
}

// HealthCheck configures active health checks: a GET of Path on each host
// every Interval, failed by a transport error, a timeout or a status other
// than 2xx.
type HealthCheck struct {
	Path     string
	Interval time.Duration // 0: off
	Timeout  time.Duration
	// UnhealthyThreshold failures in a row eject a host;
	// HealthyThreshold successes in a row readmit it.
	UnhealthyThreshold int
	HealthyThreshold   int
}

// Outlier configures passive ejection: ConsecutiveFailures responses in a
// row with a 5xx status (Envoy answers 503 when it cannot connect) eject a
// host for BaseEjection, doubled for each ejection that follows within
// MaxEjection of the last one ended, up to MaxEjection. When the ejection
// ends while the host's last active health check failed, the host stays
// out until the checks pass.
type Outlier struct {
	ConsecutiveFailures int // 0: off
	BaseEjection        time.Duration
	MaxEjection         time.Duration
	// MaxEjectionPercent bounds the share of hosts ejected passively at
	// once (at least one may be), so that failures a client provokes, or
	// an outage of something every host depends on, cannot empty the
	// fleet; 0 means 50.
	MaxEjectionPercent int
}

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

// Defaults for zero fields of enabled sources.
var (
	DefaultHealth  = HealthCheck{Path: "/health", Interval: 5 * time.Second, Timeout: time.Second, UnhealthyThreshold: 2, HealthyThreshold: 2}
	DefaultOutlier = Outlier{ConsecutiveFailures: 3, BaseEjection: 5 * time.Second, MaxEjection: 2 * time.Minute, MaxEjectionPercent: 50}
	DefaultModels  = Discovery{Path: "/v1/models", Interval: 30 * time.Second, Timeout: 2 * time.Second}
	DefaultMetrics = Scrape{Path: "/metrics", Interval: time.Second, Timeout: 500 * time.Millisecond}
)

// Watcher watches a fixed set of hosts. Run starts the active sources;
// Observe feeds the passive one.
type Watcher struct {
	target Target
	opts   Options
	log    *slog.Logger
	m      *Metrics

	ready chan struct{}   // closed after the first round
	skip  map[string]bool // hosts whose models are not asked for

	mu    sync.Mutex
	hosts map[string]*state
	order []string
}

// state is one host's health, guarded by Watcher.mu.
type state struct {
	addr string
	// Active checks.
	activeDown   bool
	activeFails  int
	activeOKs    int
	activeReason string
	activeSince  time.Time
	// Passive ejection.
	failures     int // 5xx responses in a row
	lastStatus   int
	ejections    int // ejections in a row, for the backoff
	ejectedUntil time.Time
	ejectedAt    time.Time
	lastEnd      time.Time // when the last ejection ended
	handedOver   bool      // out since its ejection ended, until checks pass
	cancel       func() bool
	modelsFailed bool // the last model list read failed
	// What the picker was last told.
	told picker.Health
	// recovered asks for the host's models again when it comes back up:
	// an engine that was loading answers /v1/models only once it is ready.
	recovered chan struct{}
}

// New returns a Watcher of hosts (as picker.ParseAddr accepts them) that
// reports to target. It fills zero fields of enabled sources with the
// defaults.
func New(target Target, hosts []string, opts Options, m *Metrics) (*Watcher, error) {
	if h, d := &opts.Health, DefaultHealth; h.Interval > 0 {
		h.Path = cmp.Or(h.Path, d.Path)
		h.Timeout = cmp.Or(h.Timeout, d.Timeout)
		h.UnhealthyThreshold = cmp.Or(h.UnhealthyThreshold, d.UnhealthyThreshold)
		h.HealthyThreshold = cmp.Or(h.HealthyThreshold, d.HealthyThreshold)
	}
	if opts.Outlier.ConsecutiveFailures > 0 {
		if opts.Outlier.BaseEjection <= 0 {
			opts.Outlier.BaseEjection = DefaultOutlier.BaseEjection
		}
		if opts.Outlier.MaxEjection < opts.Outlier.BaseEjection {
			opts.Outlier.MaxEjection = max(opts.Outlier.BaseEjection, DefaultOutlier.MaxEjection)
		}
		if opts.Outlier.MaxEjectionPercent <= 0 {
			opts.Outlier.MaxEjectionPercent = DefaultOutlier.MaxEjectionPercent
		}
	}
	if opts.Models.Interval > 0 {
		opts.Models.Path = cmp.Or(opts.Models.Path, DefaultModels.Path)
		opts.Models.Timeout = cmp.Or(opts.Models.Timeout, DefaultModels.Timeout)
	}
	if opts.Metrics.Interval > 0 {
		opts.Metrics.Path = cmp.Or(opts.Metrics.Path, DefaultMetrics.Path)
		opts.Metrics.Timeout = cmp.Or(opts.Metrics.Timeout, DefaultMetrics.Timeout)
	}
	if opts.Client == nil {
		// Backends are addressed by IP: never through a proxy from the
		// environment.
		opts.Client = &http.Client{Transport: &http.Transport{Proxy: nil, MaxIdleConnsPerHost: 4,
			IdleConnTimeout: time.Minute, ResponseHeaderTimeout: time.Minute}}
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.After == nil {
		opts.After = func(d time.Duration, f func()) func() bool { return time.AfterFunc(d, f).Stop }
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if m == nil {
		m = NewMetrics()
	}
	w := &Watcher{target: target, opts: opts, log: log, m: m, hosts: map[string]*state{}, ready: make(chan struct{}),
		skip: map[string]bool{}}
	for _, h := range opts.Models.Skip {
		if addr, err := picker.ParseAddr(h); err == nil {
			w.skip[addr] = true
		}
	}
	for _, h := range hosts {
		addr, err := picker.ParseAddr(h)
		if err != nil {
			return nil, fmt.Errorf("backend: %w", err)
		}
		w.hosts[addr] = &state{addr: addr, recovered: make(chan struct{}, 1)}
		m.healthy.WithLabelValues(addr).Set(1)
		w.order = append(w.order, addr)
	}
	return w, nil
}

// Run runs the active sources until ctx is done: each source reads every
// host at once, then again on its own interval; Ready is closed when every
// first read is done.
func (w *Watcher) Run(ctx context.Context) {
	var wg, first sync.WaitGroup
	start := func(now <-chan struct{}, f func() time.Duration) {
		first.Add(1)
		wg.Go(func() { poll(ctx, now, f, first.Done) })
	}
	for _, addr := range w.order {
		if h := w.opts.Health; h.Interval > 0 {
			start(nil, func() time.Duration { w.check(ctx, addr); return h.Interval })
		}
		if d := w.opts.Models; d.Interval > 0 && !w.skip[addr] {
			// Sooner after a failed read, and at once when the host comes
			// back up: an engine still loading its model answers
			// /v1/models only once it is ready.
			start(w.hosts[addr].recovered, func() time.Duration {
				if !w.discover(ctx, addr) {
					return min(d.Interval, modelsRetry)
				}
				return d.Interval
			})
		}
		if m := w.opts.Metrics; m.Interval > 0 {
			start(nil, func() time.Duration { w.scrape(ctx, addr); return m.Interval })
		}
	}
	go func() { first.Wait(); close(w.ready) }()
	wg.Wait()
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, s := range w.hosts {
		if s.cancel != nil {
			s.cancel()
		}
	}
}

// poll calls f at once, and then again after the wait f returned or as
// soon as now receives, until ctx is done. It calls firstDone after the
// first call.
func poll(ctx context.Context, now <-chan struct{}, f func() time.Duration, firstDone func()) {
	t := time.NewTimer(f())
	defer t.Stop()
	firstDone()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-now:
			t.Stop()
		}
		t.Reset(f())
	}
}

// modelsRetry is how soon a failed model list read is tried again.
const modelsRetry = 5 * time.Second

// Ready is closed once Run has checked every host, and read its models and
// metrics, once (each bounded by its timeout).
func (w *Watcher) Ready() <-chan struct{} { return w.ready }

// fetch GETs path on addr within timeout. A transport error or a status
// other than 2xx is an error that names the path; read, if not nil, is
// given the body (at most maxListBytes of it). What is left of the body is
// drained, up to 64 KiB, so that the connection is reused.
func (w *Watcher) fetch(ctx context.Context, addr, path string, timeout time.Duration, read func(io.Reader) error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", "http://"+addr+path, nil)
	if err != nil {
		return fmt.Errorf("GET %s: %w", path, err)
	}
	resp, err := w.opts.Client.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w", path, unwrapURL(err))
	}
	defer resp.Body.Close()
	defer io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("GET %s: status %d", path, resp.StatusCode)
	}
	if read != nil {
		if err := read(io.LimitReader(resp.Body, maxListBytes)); err != nil {
			return fmt.Errorf("GET %s: %w", path, err)
		}
	}
	return nil
}

// check runs one active health check of addr.
func (w *Watcher) check(ctx context.Context, addr string) {
	h := w.opts.Health
	var reason string
	if err := w.fetch(ctx, addr, h.Path, h.Timeout, nil); err != nil {
		if ctx.Err() != nil {
			return // shutting down: not the host's fault
		}
		reason = err.Error()
	}
	result := "ok"
	if reason != "" {
		result = "failed"
	}
	w.m.checks.WithLabelValues(addr, result).Inc()
	w.mu.Lock()
	defer w.mu.Unlock()
	s := w.hosts[addr]
	if reason == "" {
		s.activeFails = 0
		s.activeOKs++
		if s.activeDown && s.activeOKs >= h.HealthyThreshold {
			s.activeDown, s.handedOver = false, false
			w.log.Info("host passes its health checks again", "host", addr, "checks", s.activeOKs)
		}
	} else {
		s.activeOKs = 0
		s.activeFails++
		s.activeReason = fmt.Sprintf("health check: %s (%d in a row)", reason, s.activeFails)
		if !s.activeDown && s.activeFails >= h.UnhealthyThreshold {
			s.activeDown = true
			s.activeSince = w.opts.Now()
			w.m.ejections.WithLabelValues(addr, "health_check").Inc()
			w.log.Warn("host ejected: health checks fail", "host", addr, "reason", reason, "failures", s.activeFails)
		}
	}
	w.tellLocked(s)
}

// Observe notes the status of a response from addr (0 when none came), for
// passive ejection: a 5xx counts as a failure, anything else resets the
// count.
func (w *Watcher) Observe(addr string, status int) {
	o := w.opts.Outlier
	if o.ConsecutiveFailures <= 0 || status == 0 {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	s := w.hosts[addr]
	if s == nil {
		return
	}
	now := w.opts.Now()
	if now.Before(s.ejectedUntil) {
		return // answers to requests sent before the ejection
	}
	if status < 500 {
		s.failures = 0
		return
	}
	s.failures++
	s.lastStatus = status
	if s.failures < o.ConsecutiveFailures {
		return
	}
	// Eject, for longer each time it happens again soon after the last
	// ejection ended.
	if !s.lastEnd.IsZero() && now.Sub(s.lastEnd) > o.MaxEjection {
		s.ejections = 0
	}
	if ejected, most := w.ejectedLocked(now), o.MaxEjectionPercent*len(w.hosts)/100; ejected >= max(1, most) {
		w.log.Debug("host not ejected: too many hosts are ejected already", "host", addr, "ejected", ejected,
			"max_ejection_percent", o.MaxEjectionPercent)
		w.m.ejections.WithLabelValues(addr, "skipped_max_percent").Inc()
		s.failures = 0
		return
	}
	s.ejections++
	d := o.BaseEjection
	for range s.ejections - 1 {
		if d >= o.MaxEjection {
			break
		}
		d *= 2
	}
	d = min(d, o.MaxEjection)
	s.failures = 0
	s.ejectedAt, s.ejectedUntil = now, now.Add(d)
	w.m.ejections.WithLabelValues(addr, "responses").Inc()
	w.log.Warn("host ejected: responses fail", "host", addr, "status", status, "in_a_row", o.ConsecutiveFailures,
		"for", d, "ejections_in_a_row", s.ejections)
	if s.cancel != nil {
		s.cancel()
	}
	s.cancel = w.opts.After(d, func() { w.readmit(addr) })
	w.tellLocked(s)
}

// ejectedLocked counts the hosts passively ejected now.
func (w *Watcher) ejectedLocked(now time.Time) int {
	n := 0
	for _, s := range w.hosts {
		if now.Before(s.ejectedUntil) || s.handedOver {
			n++
		}
	}
	return n
}

// readmit ends a passive ejection that has run its time.
func (w *Watcher) readmit(addr string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	s := w.hosts[addr]
	now := w.opts.Now()
	if now.Before(s.ejectedUntil) {
		return // ejected again since
	}
	s.lastEnd = now
	s.cancel = nil
	if s.activeFails > 0 && !s.activeDown {
		// The last health check failed too: the checks decide when the
		// host is back, rather than a timer letting requests fail on it
		// again.
		s.activeDown, s.handedOver = true, true
		s.activeSince = s.ejectedAt
		s.activeReason = fmt.Sprintf("ejected after %d responses in a row with a 5xx status, and the last health check failed",
			w.opts.Outlier.ConsecutiveFailures)
		w.log.Warn("host stays ejected: its health checks fail", "host", addr)
	} else {
		w.log.Info("host readmitted after its ejection", "host", addr)
	}
	w.tellLocked(s)
}

// tellLocked tells the picker the host's health when it changed.
func (w *Watcher) tellLocked(s *state) {
	now := w.opts.Now()
	var h picker.Health
	switch {
	case s.activeDown:
		h = picker.Health{Down: true, Reason: s.activeReason, Since: s.activeSince}
	case now.Before(s.ejectedUntil):
		h = picker.Health{Down: true, Since: s.ejectedAt, Until: s.ejectedUntil,
			Reason: fmt.Sprintf("ejected: %d responses in a row with a 5xx status (the last %d); ejection %d in a row",
				w.opts.Outlier.ConsecutiveFailures, s.lastStatus, s.ejections)}
	case s.told.Down:
		h = picker.Health{Reason: "recovered from: " + s.told.Reason}
	default:
		return // up, and was
	}
	if h == s.told {
		return
	}
	if s.told.Down && !h.Down {
		select {
		case s.recovered <- struct{}{}:
		default:
		}
	}
	s.told = h
	up := 1.0
	if h.Down {
		up = 0
	}
	w.m.healthy.WithLabelValues(s.addr).Set(up)
	w.target.SetHealth(s.addr, h)
}

// unwrapURL drops the `Get "http://...": ` that net/http puts before a
// transport error: the host and path are said already.
func unwrapURL(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}
