package tokenizer

import "github.com/prometheus/client_golang/prometheus"

var (
	descCacheHits = prometheus.NewDesc("tokenlb_tokenizer_cache_hits_total",
		"Texts whose count was found in the cache of repeated texts.", nil, nil)
	descCacheMisses = prometheus.NewDesc("tokenlb_tokenizer_cache_misses_total",
		"Texts long enough for the cache that were not in it.", nil, nil)
	descCacheEntries = prometheus.NewDesc("tokenlb_tokenizer_cache_entries",
		"Counts held by the cache of repeated texts.", nil, nil)
	descEstimated = prometheus.NewDesc("tokenlb_tokenizer_estimated_requests_total",
		"Requests whose count was partly estimated, by what ended exact counting: the size budget (size) or the time budget (time, which wins when both did).",
		[]string{"reason"}, nil)
)

// Collector returns a Prometheus collector that reads the Tokenizer's
// counters at scrape time.
func (t *Tokenizer) Collector() prometheus.Collector { return collector{t} }

type collector struct{ t *Tokenizer }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descCacheHits, descCacheMisses, descCacheEntries, descEstimated} {
		ch <- d
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	s := c.t.Stats()
	ch <- prometheus.MustNewConstMetric(descCacheHits, prometheus.CounterValue, float64(s.CacheHits))
	ch <- prometheus.MustNewConstMetric(descCacheMisses, prometheus.CounterValue, float64(s.CacheMisses))
	ch <- prometheus.MustNewConstMetric(descCacheEntries, prometheus.GaugeValue, float64(s.CacheEntries))
	ch <- prometheus.MustNewConstMetric(descEstimated, prometheus.CounterValue, float64(s.EstimatedSize), EstimatedSize)
	ch <- prometheus.MustNewConstMetric(descEstimated, prometheus.CounterValue, float64(s.EstimatedTime), EstimatedTime)
}
