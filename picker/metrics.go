package picker

import (
	"slices"

	"github.com/prometheus/client_golang/prometheus"
)

var (
	descTokens = prometheus.NewDesc("tokenlb_host_in_flight_tokens",
		"Prompt tokens charged to a host and not yet released.", []string{"host"}, nil)
	descPrefilling = prometheus.NewDesc("tokenlb_host_prefilling_tokens",
		"In-flight prompt tokens whose first token has not come back yet.", []string{"host"}, nil)
	descLoad = prometheus.NewDesc("tokenlb_host_load_seconds",
		"Charged load not yet released: expected backend work, in seconds.", []string{"host"}, nil)
	descRequests = prometheus.NewDesc("tokenlb_host_in_flight_requests",
		"Requests routed to a host and not yet released.", []string{"host"}, nil)
	descPicks = prometheus.NewDesc("tokenlb_host_picks_total",
		"Requests routed to a host.", []string{"host"}, nil)
	descReleases = prometheus.NewDesc("tokenlb_releases_total",
		"Leases released, by what released them.", []string{"cause"}, nil)
	descSwept = prometheus.NewDesc("tokenlb_sweeper_reclaimed_tokens_total",
		"Tokens reclaimed by the sweeper from leases nobody released; anything but 0 is a bug.", nil, nil)
	descPanic = prometheus.NewDesc("tokenlb_picks_without_healthy_host_total",
		"Picks made among unhealthy hosts because none serving the model was healthy.", nil, nil)
	descAffinity = prometheus.NewDesc("tokenlb_prefix_affinity_total",
		"Picks with a prompt prefix, by what affinity did: hit (a host that served the prefix was chosen), overloaded (those were too loaded), none (no host served it recently).",
		[]string{"result"}, nil)
	descExternal = prometheus.NewDesc("tokenlb_host_external_load_seconds",
		"Load of the requests a host's backend reports beyond this tokenlb's own, in seconds of expected work.", []string{"host"}, nil)
)

// Collector returns a Prometheus collector that reads the ledger at scrape
// time, so gauges never disagree with /debug/hosts. tokenlb_releases_total
// has a series for each of causes (and Swept) from the start, and for any
// other cause once it happens.
func (p *Picker) Collector(causes ...Cause) prometheus.Collector {
	return collector{p, append(slices.Clone(causes), Swept)}
}

type collector struct {
	p      *Picker
	causes []Cause
}

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descTokens, descPrefilling, descLoad, descRequests, descPicks, descReleases, descSwept, descPanic, descAffinity, descExternal} {
		ch <- d
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	for _, h := range c.p.Hosts() {
		ch <- prometheus.MustNewConstMetric(descTokens, prometheus.GaugeValue, float64(h.InFlightTokens), h.Address)
		ch <- prometheus.MustNewConstMetric(descPrefilling, prometheus.GaugeValue, float64(h.PrefillingTokens), h.Address)
		ch <- prometheus.MustNewConstMetric(descLoad, prometheus.GaugeValue, float64(h.Load)/1e6, h.Address)
		ch <- prometheus.MustNewConstMetric(descRequests, prometheus.GaugeValue, float64(h.InFlightRequests), h.Address)
		ch <- prometheus.MustNewConstMetric(descPicks, prometheus.CounterValue, float64(h.Picks), h.Address)
		ch <- prometheus.MustNewConstMetric(descExternal, prometheus.GaugeValue, float64(h.ExternalLoad)/1e6, h.Address)
	}
	s := c.p.Stats()
	causes := slices.Clone(c.causes)
	for cause := range s.Releases {
		causes = append(causes, cause)
	}
	slices.Sort(causes)
	for _, cause := range slices.Compact(causes) {
		ch <- prometheus.MustNewConstMetric(descReleases, prometheus.CounterValue, float64(s.Releases[cause]), string(cause))
	}
	ch <- prometheus.MustNewConstMetric(descSwept, prometheus.CounterValue, float64(s.SweptTokens))
	ch <- prometheus.MustNewConstMetric(descPanic, prometheus.CounterValue, float64(s.PanicPicks))
	for _, r := range []AffinityResult{AffinityHit, AffinityOverloaded, AffinityNone} {
		ch <- prometheus.MustNewConstMetric(descAffinity, prometheus.CounterValue, float64(s.Affinity[r]), string(r))
	}
}
