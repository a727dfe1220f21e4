package backend

import "github.com/prometheus/client_golang/prometheus"

// Metrics are a Watcher's Prometheus metrics.
type Metrics struct {
	checks    *prometheus.CounterVec
	ejections *prometheus.CounterVec
	healthy   *prometheus.GaugeVec
	reads     *prometheus.CounterVec
}

// NewMetrics returns unregistered metrics; register Collectors.
func NewMetrics() *Metrics {
	return &Metrics{
		checks: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenlb_health_checks_total",
			Help: "Active health checks, by host and result (ok, failed)."}, []string{"host", "result"}),
		ejections: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenlb_host_ejections_total",
			Help: "Times a host was ejected, by host and reason (health_check; responses: 5xx in a row; connect_failure: Envoy could not connect; skipped_max_percent: one not ejected, too many were)."}, []string{"host", "reason"}),
		healthy: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "tokenlb_host_healthy",
			Help: "1 while a host may get requests, 0 while it is ejected."}, []string{"host"}),
		reads: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenlb_backend_reads_total",
			Help: "Reads of a host's model list or engine metrics, by host, what and result (ok, failed)."},
			[]string{"host", "what", "result"}),
	}
}

// Collectors returns the metrics to register.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.checks, m.ejections, m.healthy, m.reads}
}

// expect gives a new host a series for each ejection reason and check
// result from the start, so that an increase over them is 0 rather than
// absent.
func (m *Metrics) expect(host string) {
	for _, reason := range []string{"health_check", ejectedResponses, ejectedConnectFailure, "skipped_max_percent"} {
		m.ejections.WithLabelValues(host, reason)
	}
	for _, result := range []string{"ok", "failed"} {
		m.checks.WithLabelValues(host, result)
	}
}

// forget drops a removed host's series.
func (m *Metrics) forget(host string) {
	match := prometheus.Labels{"host": host}
	m.checks.DeletePartialMatch(match)
	m.ejections.DeletePartialMatch(match)
	m.healthy.DeletePartialMatch(match)
	m.reads.DeletePartialMatch(match)
}
