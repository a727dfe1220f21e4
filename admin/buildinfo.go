package admin

import (
	"runtime"
	"runtime/debug"

	"github.com/prometheus/client_golang/prometheus"
)

// BuildInfo returns tokenlb_build_info, a gauge of 1 whose labels say which
// build is running: version (the module version, "(devel)" for a build
// from a working tree), revision (the commit, with "-dirty" for modified
// sources; "" when the build recorded none) and goversion. A dashboard
// joins on it to show which version each replica runs.
func BuildInfo() prometheus.Collector {
	version, revision := "(unknown)", ""
	if bi, ok := debug.ReadBuildInfo(); ok {
		version = bi.Main.Version
		modified := false
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				revision = s.Value
			case "vcs.modified":
				modified = s.Value == "true"
			}
		}
		if modified && revision != "" {
			revision += "-dirty"
		}
	}
	g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "tokenlb_build_info",
		Help:        "Always 1; its labels say which build of tokenlb is running.",
		ConstLabels: prometheus.Labels{"version": version, "revision": revision, "goversion": runtime.Version()}})
	g.Set(1)
	return g
}
