// Package admin serves tokenlb's operations endpoints over HTTP.
package admin

import (
	"encoding/json"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/tokenlb/tokenlb/cost"
	"github.com/tokenlb/tokenlb/picker"
)

// Handler returns the admin mux:
//
//	/metrics      Prometheus metrics from reg
//	/healthz      200 while the process is up
//	/readyz       200 while ready() is true, else 503 (starting: backends
//	              not yet checked, at most a few seconds; or shutting down)
//	/debug/hosts  JSON: each host's in-flight tokens, load and requests, and
//	              what the cost model believes of its speed
func Handler(p *picker.Picker, model *cost.Estimator, reg *prometheus.Registry, ready func() bool) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !ready() {
			http.Error(w, "not ready: starting or shutting down", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ready\n"))
	})
	mux.HandleFunc("GET /debug/hosts", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		type hostView struct {
			picker.HostLoad
			Speed cost.HostSpeed `json:"speed"`
		}
		var hosts []hostView
		for _, h := range p.Hosts() {
			hosts = append(hosts, hostView{h, model.Speed(h.Address)})
		}
		enc.Encode(struct {
			Hosts []hostView `json:"hosts"`
		}{hosts})
	})
	return mux
}
