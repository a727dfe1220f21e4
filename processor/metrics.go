package processor

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the Server's Prometheus metrics. Register them with
// Collectors.
type Metrics struct {
	streams         prometheus.Gauge
	requestTokens   *prometheus.HistogramVec
	tokenizeSeconds prometheus.Histogram
	pickSeconds     prometheus.Histogram
	rejections      *prometheus.CounterVec
}

// NewMetrics returns unregistered metrics.
func NewMetrics() *Metrics {
	return &Metrics{
		streams: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tokenlb_streams_active", Help: "ext_proc streams (HTTP requests) being served."}),
		requestTokens: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "tokenlb_request_prompt_tokens", Help: "Prompt tokens per routed request, by API.",
			Buckets: prometheus.ExponentialBuckets(16, 2, 14)}, []string{"api"}),
		tokenizeSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "tokenlb_tokenize_duration_seconds", Help: "Time to parse a request body and count its tokens.",
			Buckets: prometheus.ExponentialBuckets(25e-6, 2.5, 12)}),
		pickSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "tokenlb_pick_duration_seconds", Help: "Time to pick and charge a host.",
			Buckets: prometheus.ExponentialBuckets(1e-7, 4, 10)}),
		rejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tokenlb_rejections_total", Help: "Requests tokenlb answered itself, by reason."}, []string{"reason"}),
	}
}

// Collectors returns the metrics for registration.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.streams, m.requestTokens, m.tokenizeSeconds, m.pickSeconds, m.rejections}
}
