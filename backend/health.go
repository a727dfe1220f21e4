package backend

import (
	"cmp"
	"context"
	"fmt"
	"time"
)

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

// DefaultHealth fills the zero fields of enabled health checks.
var DefaultHealth = HealthCheck{Path: "/health", Interval: 5 * time.Second, Timeout: time.Second, UnhealthyThreshold: 2, HealthyThreshold: 2}

// withDefaults returns h with its zero fields taken from DefaultHealth, if
// the checks are on.
func (h HealthCheck) withDefaults() HealthCheck {
	if h.Interval <= 0 {
		return h
	}
	d := DefaultHealth
	h.Path = cmp.Or(h.Path, d.Path)
	h.Timeout = cmp.Or(h.Timeout, d.Timeout)
	h.UnhealthyThreshold = cmp.Or(h.UnhealthyThreshold, d.UnhealthyThreshold)
	h.HealthyThreshold = cmp.Or(h.HealthyThreshold, d.HealthyThreshold)
	return h
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
	if s == nil {
		return // removed meanwhile
	}
	if reason == "" {
		s.activeFails = 0
		s.activeOKs++
		if s.activeDown && s.activeOKs >= h.HealthyThreshold {
			s.activeDown, s.heldForChecks = false, false
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
	w.publishHealthLocked(s)
}
