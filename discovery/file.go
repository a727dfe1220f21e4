// Package discovery tells tokenlb which backends exist, as that changes.
//
// File is the static source: the hosts of tokenlb's configuration file,
// read again when the file changes or on demand (SIGHUP), without a
// restart.
package discovery

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Endpoint is one backend.
type Endpoint struct {
	// Address is a literal ip:port.
	Address string
	// Models it serves, if the configuration lists them; nil: discovered.
	Models []string
	// Source says where it came from, for /debug/hosts: "static",
	// "dns <name:port>", or "kubernetes inferencepool|service
	// <namespace>/<name>".
	Source string
	// Namespace and Pod name the pod behind it, when known (kubernetes).
	Namespace, Pod string
}

// File watches a configuration file for its endpoints.
type File struct {
	// Path is the file; Load reads it (and validates it whole).
	Path string
	Load func() ([]Endpoint, error)
	// Interval is how often the file's size and modification time are
	// looked at; 0 means every second.
	Interval time.Duration
	// Reload asks for a read now, changed or not (SIGHUP).
	Reload <-chan os.Signal
	Logger *slog.Logger
	// Errors counts reads that failed; nil counts nothing.
	Errors prometheus.Counter
}

// Run reports the file's endpoints to update whenever a read gives a set
// other than the last one reported (initial is the set running now),
// until ctx is done. A read that fails keeps the running set: the error
// (which names the field) is logged and counted.
func (f *File) Run(ctx context.Context, initial []Endpoint, update func([]Endpoint)) {
	log := f.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	interval := f.Interval
	if interval <= 0 {
		interval = time.Second
	}
	last, stamp := slices.Clone(initial), f.stamp()
	t := time.NewTicker(interval)
	defer t.Stop()
	// A first read at once: the file may have changed since initial was
	// read from it.
	for first := true; ; first = false {
		if !first {
			select {
			case <-ctx.Done():
				return
			case <-f.Reload:
				log.Info("reloading the configuration's hosts", "file", f.Path)
			case <-t.C:
				s := f.stamp()
				if s == stamp {
					continue
				}
				stamp = s
			}
		}
		next, err := f.Load()
		if err != nil {
			if f.Errors != nil {
				f.Errors.Inc()
			}
			log.Error("configuration not reloaded: keeping the running hosts", "file", f.Path, "err", err)
			continue
		}
		if slices.EqualFunc(next, last, func(a, b Endpoint) bool {
			return a.Address == b.Address && slices.Equal(a.Models, b.Models)
		}) {
			continue
		}
		last = next
		update(next)
	}
}

// stamp sums up the file's size and modification time.
func (f *File) stamp() string {
	fi, err := os.Stat(f.Path)
	if err != nil {
		return "missing"
	}
	return fmt.Sprintf("%d/%d", fi.Size(), fi.ModTime().UnixNano())
}
