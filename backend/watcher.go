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
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/tokenlb/tokenlb/picker"
)

// Target receives what a Watcher learns; *picker.Picker is one. Each method
// fails only for a host the target does not know.
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
	// is bounded by its source's Timeout, and no redirect is followed
	// (whatever the client's CheckRedirect): a 3xx fails the check.
	Client *http.Client
	Logger *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// After schedules f after d (readmission after an ejection); nil means
	// time.AfterFunc.
	After func(d time.Duration, f func()) func() bool
}

// Watcher watches a set of hosts, which SetHosts changes. Run starts the
// active sources; Observe feeds the passive one.
type Watcher struct {
	target Target
	opts   Options
	log    *slog.Logger
	m      *Metrics

	ready   chan struct{} // closed after the first round
	pollers sync.WaitGroup

	mu         sync.Mutex
	skipModels map[string]bool // hosts whose models are not asked for
	hosts      map[string]*hostState
	addrs      []string        // the hosts, in order
	running    context.Context // Run's, while it runs (nil before, and once it stops)
}

// hostState is what a Watcher knows of one host, guarded by Watcher.mu.
type hostState struct {
	addr string
	// Active checks.
	activeDown   bool
	activeFails  int
	activeOKs    int
	activeReason string
	activeSince  time.Time
	// Passive ejection.
	consecutive5xx  int // 5xx responses in a row
	lastStatus      int
	ejectionsInRow  int // ejections soon after one another, for the backoff
	ejectedUntil    time.Time
	ejectedAt       time.Time
	ejectedFor      string // the last ejection's reason label (ejectedResponses, ejectedConnectFailure)
	lastEjectionEnd time.Time
	heldForChecks   bool        // out since its ejection ended, until checks pass
	cancelReadmit   func() bool // stops the pending readmission, if any
	// Model discovery.
	modelsFailed bool // the last model list read failed
	// published is what the picker was last told of the host's health.
	published picker.Health
	// recovered asks for the host's models again when it comes back up:
	// an engine that was loading answers /v1/models only once it is ready.
	recovered chan struct{}
	// stop ends the host's pollers (SetHosts removed it).
	stop context.CancelFunc
}

// New returns a Watcher of hosts (as picker.ParseAddr accepts them) that
// reports to target. It fills zero fields of enabled sources with the
// defaults.
func New(target Target, hosts []string, opts Options, m *Metrics) (*Watcher, error) {
	opts.Health = opts.Health.withDefaults()
	opts.Outlier = opts.Outlier.withDefaults()
	opts.Models = opts.Models.withDefaults()
	opts.Metrics = opts.Metrics.withDefaults()
	if opts.Client == nil {
		opts.Client = newClient()
	} else {
		c := *opts.Client
		opts.Client = &c
	}
	// A host that redirects must not make tokenlb fetch another URL, nor
	// pass a check with some other page's answer.
	opts.Client.CheckRedirect = noRedirects
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
	w := &Watcher{target: target, opts: opts, log: log, m: m, hosts: map[string]*hostState{}, ready: make(chan struct{}),
		skipModels: map[string]bool{}}
	for _, h := range opts.Models.Skip {
		if addr, err := picker.ParseAddr(h); err == nil {
			w.skipModels[addr] = true
		}
	}
	addrs, err := parseHosts(hosts)
	if err != nil {
		return nil, err
	}
	for _, addr := range addrs {
		w.addLocked(addr)
	}
	return w, nil
}

func parseHosts(hosts []string) ([]string, error) {
	var addrs []string
	for _, h := range hosts {
		addr, err := picker.ParseAddr(h)
		if err != nil {
			return nil, fmt.Errorf("backend: %w", err)
		}
		addrs = append(addrs, addr)
	}
	return addrs, nil
}

func (w *Watcher) addLocked(addr string) {
	w.hosts[addr] = &hostState{addr: addr, recovered: make(chan struct{}, 1)}
	w.m.healthy.WithLabelValues(addr).Set(1)
	w.m.expect(addr)
	w.addrs = append(w.addrs, addr)
}

// SetHosts makes hosts the watched set: a new host is checked, read and
// scraped at once (while Run runs), starting healthy; a removed one is no
// longer contacted, and what was known of it goes, metrics included.
// skipModels are the hosts whose models are configured, not asked for
// (as Options.Models.Skip, which it replaces); it applies to hosts added
// from now on. Tell the Target first, so that it knows a new host before
// the first report about it.
func (w *Watcher) SetHosts(hosts, skipModels []string) error {
	addrs, err := parseHosts(hosts)
	if err != nil {
		return err
	}
	skip, err := parseHosts(skipModels)
	if err != nil {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.skipModels = make(map[string]bool, len(skip))
	for _, a := range skip {
		w.skipModels[a] = true
	}
	keep := make(map[string]bool, len(addrs))
	for _, a := range addrs {
		keep[a] = true
	}
	for _, a := range w.addrs {
		if keep[a] {
			continue
		}
		s := w.hosts[a]
		if s.stop != nil {
			s.stop()
		}
		if s.cancelReadmit != nil {
			s.cancelReadmit()
		}
		delete(w.hosts, a)
		w.m.forget(a)
	}
	w.addrs = slices.DeleteFunc(w.addrs, func(a string) bool { return !keep[a] })
	for _, a := range addrs {
		if w.hosts[a] != nil {
			continue
		}
		w.addLocked(a)
		if w.running != nil {
			w.startLocked(a, nil)
		}
	}
	return nil
}

// Run runs the active sources until ctx is done: each source reads every
// host at once, then again on its own interval; Ready is closed when every
// first read is done.
func (w *Watcher) Run(ctx context.Context) {
	var first sync.WaitGroup
	w.mu.Lock()
	w.running = ctx
	for _, addr := range w.addrs {
		w.startLocked(addr, &first)
	}
	w.mu.Unlock()
	go func() { first.Wait(); close(w.ready) }()
	<-ctx.Done()
	w.mu.Lock()
	w.running = nil // SetHosts starts no poller from now on
	w.mu.Unlock()
	w.pollers.Wait()
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, s := range w.hosts {
		if s.cancelReadmit != nil {
			s.cancelReadmit()
		}
	}
}

// startLocked starts addr's pollers, under a context of its own that
// SetHosts cancels when it removes the host. first, if not nil, counts
// each poller's first round.
func (w *Watcher) startLocked(addr string, first *sync.WaitGroup) {
	ctx, stop := context.WithCancel(w.running)
	s := w.hosts[addr]
	s.stop = stop
	start := func(wake <-chan struct{}, f func() time.Duration) {
		done := func() {}
		if first != nil {
			first.Add(1)
			done = first.Done
		}
		w.pollers.Go(func() { poll(ctx, wake, f, done) })
	}
	if h := w.opts.Health; h.Interval > 0 {
		start(nil, func() time.Duration { w.check(ctx, addr); return h.Interval })
	}
	if d := w.opts.Models; d.Interval > 0 && !w.skipModels[addr] {
		// Sooner after a failed read, and at once when the host comes
		// back up: an engine still loading its model answers /v1/models
		// only once it is ready.
		start(s.recovered, func() time.Duration {
			if !w.discover(ctx, addr) {
				return min(d.Interval, modelsRetryInterval)
			}
			return d.Interval
		})
	}
	if m := w.opts.Metrics; m.Interval > 0 {
		start(nil, func() time.Duration { w.scrape(ctx, addr); return m.Interval })
	}
}

// poll calls f at once, and then again after the wait f returned or as
// soon as wake receives, until ctx is done. It calls firstDone after the
// first call.
func poll(ctx context.Context, wake <-chan struct{}, f func() time.Duration, firstDone func()) {
	t := time.NewTimer(f())
	defer t.Stop()
	firstDone()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-wake:
			t.Stop()
		}
		t.Reset(f())
	}
}

// Ready is closed once Run has checked every host, and read its models and
// metrics, once (each bounded by its timeout).
func (w *Watcher) Ready() <-chan struct{} { return w.ready }

// publishHealthLocked tells the picker s's health, from its active checks
// and its passive ejection, when it changed since it was last told.
func (w *Watcher) publishHealthLocked(s *hostState) {
	now := w.opts.Now()
	var h picker.Health
	switch {
	case s.activeDown:
		h = picker.Health{Down: true, Reason: s.activeReason, Since: s.activeSince}
	case now.Before(s.ejectedUntil):
		cause := w.ejectionCause(s)
		if s.ejectedFor != ejectedConnectFailure {
			cause += fmt.Sprintf(" (the last %d)", s.lastStatus)
		}
		h = picker.Health{Down: true, Since: s.ejectedAt, Until: s.ejectedUntil,
			Reason: fmt.Sprintf("ejected: %s; ejection %d in a row", cause, s.ejectionsInRow)}
	case s.published.Down:
		h = picker.Health{Reason: "recovered from: " + s.published.Reason}
	default:
		return // up, and was
	}
	if h == s.published {
		return
	}
	if s.published.Down && !h.Down {
		select {
		case s.recovered <- struct{}{}:
		default:
		}
	}
	s.published = h
	up := 1.0
	if h.Down {
		up = 0
	}
	w.m.healthy.WithLabelValues(s.addr).Set(up)
	w.warnIfRefused("health", s.addr, w.target.SetHealth(s.addr, h))
}

// warnIfRefused logs an error from the target, which refuses only a host it
// does not know: the target and the Watcher were given different hosts.
// what names the update refused (health, models, remote).
func (w *Watcher) warnIfRefused(what, addr string, err error) {
	if err != nil {
		w.log.Warn("target refused an update about a host", "update", what, "host", addr, "err", err)
	}
}
