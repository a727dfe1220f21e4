package backend

import (
	"fmt"
	"time"
)

// Outlier configures passive ejection: ConsecutiveFailures responses in a
// row with a 5xx status, or a single connection Envoy failed to open to the
// host (ConnectFailure), eject a host for BaseEjection, doubled for each
// ejection that follows within MaxEjection of the last one ended, up to
// MaxEjection. When the ejection ends while the host's last active health
// check failed, the host stays out until the checks pass.
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

// DefaultOutlier fills the zero fields of enabled passive ejection.
var DefaultOutlier = Outlier{ConsecutiveFailures: 3, BaseEjection: 5 * time.Second, MaxEjection: 2 * time.Minute, MaxEjectionPercent: 50}

// withDefaults returns o with its unset fields taken from DefaultOutlier, if
// passive ejection is on. A MaxEjection below BaseEjection is unset.
func (o Outlier) withDefaults() Outlier {
	if o.ConsecutiveFailures <= 0 {
		return o
	}
	d := DefaultOutlier
	if o.BaseEjection <= 0 {
		o.BaseEjection = d.BaseEjection
	}
	if o.MaxEjection < o.BaseEjection {
		o.MaxEjection = max(o.BaseEjection, d.MaxEjection)
	}
	if o.MaxEjectionPercent <= 0 {
		o.MaxEjectionPercent = d.MaxEjectionPercent
	}
	return o
}

// backoff returns how long the nth ejection in a row lasts: BaseEjection
// doubled for each one before it, up to MaxEjection (and without
// overflowing on the way).
func (o Outlier) backoff(n int) time.Duration {
	d := o.BaseEjection
	for range n - 1 {
		if d >= o.MaxEjection {
			break
		}
		d *= 2
	}
	return min(d, o.MaxEjection)
}

// ConnectFailure is the status Observe takes for a request Envoy could not
// connect to the host for (connection refused or timed out: Envoy's own 503
// with response flag UF). It is not an HTTP status: Envoy's 503 proves,
// unlike a backend's own 5xx, that the host cannot be reached, so one
// ejects it at once.
const ConnectFailure = -1

// Why a host was ejected passively: the values of
// tokenlb_host_ejections_total's reason label besides health_check and
// skipped_max_percent.
const (
	ejectedResponses      = "responses"       // ConsecutiveFailures 5xx in a row
	ejectedConnectFailure = "connect_failure" // Envoy could not connect (ConnectFailure)
)

// Observe notes the status of a response from addr (0 when none came), or
// ConnectFailure, for passive ejection: ConnectFailure ejects the host, a
// 5xx counts as a failure, anything else resets the count.
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
	connect, reason := status == ConnectFailure, ejectedConnectFailure
	if !connect {
		if status < 500 {
			s.consecutive5xx = 0
			return
		}
		s.consecutive5xx++
		s.lastStatus = status
		if s.consecutive5xx < o.ConsecutiveFailures {
			return
		}
		reason = ejectedResponses
	}
	// Eject, for longer each time it happens again soon after the last
	// ejection ended.
	if !s.lastEjectionEnd.IsZero() && now.Sub(s.lastEjectionEnd) > o.MaxEjection {
		s.ejectionsInRow = 0
	}
	if ejected, most := w.countEjectedLocked(now), o.MaxEjectionPercent*len(w.hosts)/100; ejected >= max(1, most) {
		w.log.Debug("host not ejected: too many hosts are ejected already", "host", addr, "ejected", ejected,
			"max_ejection_percent", o.MaxEjectionPercent)
		w.m.ejections.WithLabelValues(addr, "skipped_max_percent").Inc()
		s.consecutive5xx = 0
		return
	}
	s.ejectionsInRow++
	d := o.backoff(s.ejectionsInRow)
	s.consecutive5xx = 0
	s.ejectedAt, s.ejectedUntil, s.ejectedFor = now, now.Add(d), reason
	w.m.ejections.WithLabelValues(addr, reason).Inc()
	if connect {
		w.log.Warn("host ejected: Envoy could not connect to it", "host", addr, "for", d, "ejections_in_a_row", s.ejectionsInRow)
	} else {
		w.log.Warn("host ejected: responses fail", "host", addr, "status", status, "in_a_row", o.ConsecutiveFailures,
			"for", d, "ejections_in_a_row", s.ejectionsInRow)
	}
	if s.cancelReadmit != nil {
		s.cancelReadmit()
	}
	s.cancelReadmit = w.opts.After(d, func() { w.readmit(addr) })
	w.publishHealthLocked(s)
}

// countEjectedLocked counts the hosts passively ejected now, those handed
// over to their health checks included.
func (w *Watcher) countEjectedLocked(now time.Time) int {
	n := 0
	for _, s := range w.hosts {
		if now.Before(s.ejectedUntil) || s.heldForChecks {
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
	if s == nil {
		return // removed meanwhile
	}
	now := w.opts.Now()
	if now.Before(s.ejectedUntil) {
		return // ejected again since
	}
	s.lastEjectionEnd = now
	s.cancelReadmit = nil
	switch {
	case s.activeFails > 0 && !s.activeDown:
		// The last health check failed too: the checks decide when the
		// host is back, rather than a timer letting requests fail on it
		// again.
		s.activeDown, s.heldForChecks = true, true
		s.activeSince = s.ejectedAt
		s.activeReason = "ejected after " + w.ejectionCause(s) + ", and the last health check failed"
		w.log.Warn("host stays ejected: its health checks fail", "host", addr)
	case s.activeDown:
		w.log.Info("host's ejection ended; its failing health checks keep it out", "host", addr)
	default:
		w.log.Info("host readmitted after its ejection", "host", addr)
	}
	w.publishHealthLocked(s)
}

// ejectionCause says why s was last ejected passively, for its health
// reason.
func (w *Watcher) ejectionCause(s *hostState) string {
	if s.ejectedFor == ejectedConnectFailure {
		return "Envoy could not connect to it"
	}
	return fmt.Sprintf("%d responses in a row with a 5xx status", w.opts.Outlier.ConsecutiveFailures)
}
