package route

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the Router's Prometheus metrics. Register them with
// Collectors.
type Metrics struct {
	requestTokens   *prometheus.HistogramVec
	tokenizeSeconds prometheus.Histogram
	pickSeconds     prometheus.Histogram
	outputTokens    prometheus.Histogram
	usageSeen       *prometheus.CounterVec
	predictionError *prometheus.HistogramVec
	moved           prometheus.Counter
	followed        *prometheus.CounterVec
	ttft            prometheus.Histogram
	duration        prometheus.Histogram
}

// NewMetrics returns unregistered metrics, the labelled counters with a
// series for each of their values from the start.
func NewMetrics() *Metrics {
	m := newMetrics()
	for _, v := range []string{"yes", "no"} {
		m.usageSeen.WithLabelValues(v)
	}
	for _, v := range []string{"end", "first_token"} {
		m.followed.WithLabelValues(v)
	}
	return m
}

func newMetrics() *Metrics {
	return &Metrics{
		requestTokens: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "tokenlb_request_prompt_tokens", Help: "Prompt tokens per routed request, by API.",
			Buckets: prometheus.ExponentialBuckets(16, 2, 14)}, []string{"api"}),
		tokenizeSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "tokenlb_tokenize_duration_seconds", Help: "Time to parse a request body and count its tokens.",
			Buckets: prometheus.ExponentialBuckets(25e-6, 2.5, 12)}),
		pickSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "tokenlb_pick_duration_seconds", Help: "Time to pick and charge a host.",
			Buckets: prometheus.ExponentialBuckets(1e-7, 4, 10)}),
		outputTokens: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "tokenlb_request_expected_output_tokens", Help: "Output tokens the cost model expected per routed request.",
			Buckets: prometheus.ExponentialBuckets(4, 2, 14)}),
		usageSeen: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tokenlb_responses_usage_total", Help: "Successful responses followed to their end, by whether they reported usage."},
			[]string{"usage"}),
		predictionError: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "tokenlb_ttft_prediction_error_ratio",
			Help:    "How far the predicted time to first token was from the observed one, as |predicted - observed| / observed, per host.",
			Buckets: []float64{0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 4}}, []string{"host"}),
		moved: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tokenlb_requests_served_elsewhere_total",
			Help: "Requests the data plane reports it served on another host than the chosen one (a retry on a fallback); their charge moved there."}),
		ttft: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "tokenlb_response_ttft_seconds", Help: "Time from routing to the first token of successful streamed responses, as tokenlb sees it.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 14)}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "tokenlb_response_duration_seconds", Help: "Time from routing to the end of successful responses, as tokenlb sees it (to the end stream's close for those not followed).",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 16)}),
		followed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tokenlb_streamed_responses_followed_total",
			Help: "Successful streamed responses at their first token, by how far tokenlb follows them: to the end (for usage), or no further (follow_interval)."},
			[]string{"to"}),
	}
}

// Collectors returns the metrics for registration.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.requestTokens, m.tokenizeSeconds, m.pickSeconds, m.outputTokens, m.usageSeen,
		m.predictionError, m.moved, m.followed, m.ttft, m.duration}
}
