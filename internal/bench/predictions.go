package bench

import (
	"encoding/json"
	"io"
	"math"
	"net/http"
	"slices"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// readPredictions reads from a tokenlb's admin server how well it predicted
// times to first token (the median of its prediction error histogram, over
// every host) and the regime it learned for each host, into res. A tokenlb
// that predicts nothing leaves both empty.
func readPredictions(admin string, res *Result) {
	client := &http.Client{Timeout: 5 * time.Second}
	if resp, err := client.Get(admin + "/metrics"); err == nil {
		res.PredictionError = histogramMedian(resp.Body, "tokenlb_ttft_prediction_error_ratio")
		resp.Body.Close()
	}
	resp, err := client.Get(admin + "/debug/hosts")
	if err != nil {
		return
	}
	defer resp.Body.Close()
	var hosts struct {
		Hosts []struct {
			Address string `json:"address"`
			Speed   struct {
				Regime map[string]float64 `json:"regime"`
				Slots  int                `json:"slots"`
				Trust  float64            `json:"cache_trust"`
			} `json:"speed"`
		} `json:"hosts"`
	}
	if json.NewDecoder(resp.Body).Decode(&hosts) != nil {
		return
	}
	for _, h := range hosts.Hosts {
		if h.Speed.Regime != nil {
			if res.Regimes == nil {
				res.Regimes = map[string]map[string]float64{}
			}
			h.Speed.Regime["slots"], h.Speed.Regime["cache_trust"] = float64(h.Speed.Slots), h.Speed.Trust
			res.Regimes[h.Address] = h.Speed.Regime
		}
	}
}

// histogramMedian returns the median of the histogram name in a Prometheus
// text exposition, its series summed, by linear interpolation within the
// bucket that holds it; 0 when it has no observations.
func histogramMedian(r io.Reader, name string) float64 {
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(r)
	if err != nil || families[name] == nil {
		return 0
	}
	counts := map[float64]float64{}
	var total float64
	for _, m := range families[name].GetMetric() {
		h := m.GetHistogram()
		total += float64(h.GetSampleCount())
		for _, b := range h.GetBucket() {
			counts[b.GetUpperBound()] += float64(b.GetCumulativeCount())
		}
	}
	if total == 0 {
		return 0
	}
	var bounds []float64
	for ub := range counts {
		bounds = append(bounds, ub)
	}
	return medianOfBuckets(bounds, counts, total)
}

// medianOfBuckets interpolates the median of a histogram whose cumulative
// counts by upper bound are counts, of total observations.
func medianOfBuckets(bounds []float64, counts map[float64]float64, total float64) float64 {
	slices.Sort(bounds)
	half := total / 2
	lower, below := 0.0, 0.0
	for _, ub := range bounds {
		c := counts[ub]
		if c >= half {
			if math.IsInf(ub, 1) {
				return lower
			}
			if c == below {
				return ub
			}
			return lower + (ub-lower)*(half-below)/(c-below)
		}
		lower, below = ub, c
	}
	return lower
}
