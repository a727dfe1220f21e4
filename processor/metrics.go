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

// NewMetrics returns unregistered metrics.
func NewMetrics() *Metrics {
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
