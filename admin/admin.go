// Package admin serves tokenlb's operations endpoints over HTTP: metrics,
// liveness, readiness, a JSON view of each host's load and, when asked
// for, Go's profiles.
package admin

import (
	"encoding/json"
	"net/http"
	"net/http/pprof"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/tokenlb/tokenlb/cost"
	"github.com/tokenlb/tokenlb/picker"
)

// HostLister reports each host's load; *picker.Picker is one.
type HostLister interface {
	Hosts() []picker.HostLoad
}

// SpeedReporter reports what the cost model believes of a host's speed;
// *cost.Estimator is one.
type SpeedReporter interface {
	Speed(host string) cost.HostSpeed
}

// The types tokenlb passes to Handler.
var (
	_ HostLister    = (*picker.Picker)(nil)
	_ SpeedReporter = (*cost.Estimator)(nil)
)

// Options are the admin mux's optional endpoints.
type Options struct {
	// Pprof serves net/http/pprof's profiles under /debug/pprof/. Off by
	// default: they show the process's internals (its command line, its
	// memory and every goroutine's stack) to whoever reaches the admin
	// port, and a CPU profile or trace costs CPU while it runs.
	Pprof bool
}

// Handler returns the admin mux:
//
//	/metrics      Prometheus metrics from metrics
//	/healthz      200 while the process is up
//	/readyz       200 while ready() is true, else 503 (starting: backends
//	              not yet checked, at most a few seconds; or shutting down)
//	/debug/hosts  JSON: each host's in-flight tokens, load and requests (from
//	              hosts), and what the cost model believes of its speed (from
//	              speeds)
//	/debug/pprof/ net/http/pprof's index and profiles, only with opts.Pprof
//	              (404 without)
//
// The profiles are registered on this mux alone; the handlers net/http/pprof
// puts on http.DefaultServeMux when imported are served by nothing in
// tokenlb.
func Handler(hosts HostLister, speeds SpeedReporter, metrics prometheus.Gatherer, ready func() bool, opts Options) http.Handler {
	mux := http.NewServeMux()
	if opts.Pprof {
		mux.HandleFunc("GET /debug/pprof/", pprof.Index) // and the named profiles: heap, goroutine, allocs, ...
		mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("POST /debug/pprof/symbol", pprof.Symbol) // as go tool pprof asks
		mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	}
	mux.Handle("GET /metrics", promhttp.HandlerFor(metrics, promhttp.HandlerOpts{}))
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
		var views []hostView
		for _, h := range hosts.Hosts() {
			views = append(views, hostView{h, speeds.Speed(h.Address)})
		}
		enc.Encode(struct {
			Hosts []hostView `json:"hosts"`
		}{views})
	})
	return mux
}

// Timeouts bound what one admin client can hold: a connection's headers,
// its whole request, the response and an idle keep-alive.
type Timeouts struct {
	Header, Read, Write, Idle time.Duration
}

// DefaultTimeouts suit scrapes and probes: a Prometheus scrape of a few
// hundred hosts' series is written in well under Write.
func DefaultTimeouts() Timeouts {
	return Timeouts{Header: 10 * time.Second, Read: 30 * time.Second, Write: 30 * time.Second, Idle: 60 * time.Second}
}

// NewServer returns the admin HTTP server for h with timeouts t, so that
// slow or idle clients cannot keep connections open.
func NewServer(h http.Handler, t Timeouts) *http.Server {
	return &http.Server{Handler: h, ReadHeaderTimeout: t.Header, ReadTimeout: t.Read, WriteTimeout: t.Write, IdleTimeout: t.Idle}
}
