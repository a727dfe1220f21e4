package processor

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the Server's Prometheus metrics. Register them with
// Collectors.
type Metrics struct {
	streams        prometheus.Gauge
	rejections     *prometheus.CounterVec
	observerClaims *prometheus.CounterVec
	handovers      prometheus.Counter
}

// Reasons are the rejection reasons of the Server's own answers (the
// protocol's and its limits'); a Router adds its own (ExpectRejections).
var Reasons = []string{"body_too_large", "unsupported_body_mode", "trailers_without_body"}

// NewMetrics returns unregistered metrics, with a series for each of the
// Server's own rejection reasons and each observer claim result from the
// start, so that a rate over them is 0 rather than absent.
func NewMetrics() *Metrics {
	m := newMetrics()
	m.ExpectRejections(Reasons...)
	for _, role := range []string{"observer", "end"} {
		for _, result := range []string{"claimed", "late", "unknown"} {
			m.observerClaims.WithLabelValues(role, result)
		}
	}
	m.observerClaims.WithLabelValues("observer", "none")
	return m
}

// ExpectRejections gives tokenlb_rejections_total a series for each of
// reasons from the start: the Router's, which only it knows.
func (m *Metrics) ExpectRejections(reasons ...string) {
	for _, r := range reasons {
		m.rejections.WithLabelValues(r)
	}
}

func newMetrics() *Metrics {
	return &Metrics{
		streams: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tokenlb_streams_active", Help: "ext_proc streams (HTTP requests) being served."}),
		rejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tokenlb_rejections_total", Help: "Requests tokenlb answered itself, by reason."}, []string{"reason"}),
		observerClaims: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tokenlb_observer_claims_total", Help: "Observer and end streams (role) by what their lease header found: " +
				"claimed, late (the routing stream follows the response itself, or another stream of the role claimed it) or unknown; " +
				"none counts requests no observer claimed in time."}, []string{"role", "result"}),
		handovers: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tokenlb_observer_handovers_total", Help: "Responses the observer stopped following after their first token, " +
				"leaving their end to the end stream."}),
	}
}

// Collectors returns the metrics for registration.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.streams, m.rejections, m.observerClaims, m.handovers}
}
