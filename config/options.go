package config

import (
	"github.com/tokenlb/tokenlb/backend"
	"github.com/tokenlb/tokenlb/cost"
	"github.com/tokenlb/tokenlb/picker"
	"github.com/tokenlb/tokenlb/prefix"
	"github.com/tokenlb/tokenlb/processor"
	"github.com/tokenlb/tokenlb/route"
	"github.com/tokenlb/tokenlb/tokenizer"
)

// This file turns settings into each package's options: the one place
// where a setting meets the package that uses it.

// Options returns the cost model options.
func (c Cost) Options() cost.Options {
	return cost.Options{TwoPhase: c.TwoPhase, EstimateOutput: c.EstimateOutput, Calibrate: c.Calibrate,
		DecodeWeight: c.DecodeWeight, OutputTokens: c.OutputTokens,
		PrefillTokensPerSecond: c.PrefillTokensPerSecond, DecodeTokensPerSecond: c.DecodeTokensPerSecond}
}

// Options returns the tokenizer options for encoding.
func (t Tokenizer) Options(encoding string) tokenizer.Options {
	entries := t.CacheEntries
	if entries == 0 {
		entries = -1 // off
	}
	return tokenizer.Options{Encoding: encoding, Engine: t.Engine, CacheEntries: entries,
		CacheMinBytes: t.CacheMinBytes, ExactBytes: t.ExactBytes, TimeLimit: t.TimeLimit}
}

// Watch returns the backend watcher's options.
func (c *Config) Watch() backend.Options {
	o := backend.Options{
		Health: backend.HealthCheck(c.HealthCheck),
		Outlier: backend.Outlier{ConsecutiveFailures: c.OutlierDetection.Consecutive5xx,
			BaseEjection: c.OutlierDetection.BaseEjectionTime, MaxEjection: c.OutlierDetection.MaxEjectionTime,
			MaxEjectionPercent: c.OutlierDetection.MaxEjectionPercent},
		Metrics: backend.Scrape{Path: c.BackendMetrics.Path, Interval: c.BackendMetrics.Interval},
	}
	if c.Models.Routing {
		o.Models = backend.Discovery{Interval: c.Models.DiscoveryInterval}
		for _, h := range c.Hosts {
			if len(h.Models) > 0 {
				o.Models.Skip = append(o.Models.Skip, h.Address)
			}
		}
	}
	return o
}

// Affinity returns the picker's prefix affinity options, with the cost's
// unit (microseconds of work): the prefill a prefix saves is priced at the
// prior prefill speed.
func (c *Config) Affinity() picker.Affinity {
	return picker.Affinity{MaxExtraLoad: c.PrefixAffinity.MaxExtraLoad.Microseconds(), TTL: c.PrefixAffinity.TTL,
		Entries: c.PrefixAffinity.Entries, PrefillPerToken: 1e6 / c.Cost.PrefillTokensPerSecond}
}

// PickerOptions returns the picker's options.
func (c *Config) PickerOptions() picker.Options {
	return picker.Options{MaxInFlightTokens: c.MaxInFlightTokensPerHost, Tolerance: picker.DefaultTolerance,
		StallWeight: c.Cost.StallWeight, Affinity: c.Affinity(),
		// Hosts whose models are never asked for serve any model.
		UnknownServesAny: c.Models.DiscoveryInterval == 0}
}

// Processor returns the ext_proc server's configuration, without its
// logger and metrics.
func (c *Config) Processor() processor.Config {
	return processor.Config{DestinationHeader: c.DestinationHeader, DestinationList: c.DestinationList, MaxBodyBytes: c.MaxBodyBytes,
		Observer: c.Response.Observer, LeaseHeader: c.Response.LeaseHeader, ObserverGrace: c.Response.ObserverGrace,
		LogRejections: c.LogRequests > 0}
}

// Route returns the router's settings; the caller adds the picker,
// tokenizer, cost estimator, status sink, logger and metrics it runs with.
// Prompts are hashed for prefix affinity only when it is on.
func (c *Config) Route() route.Config {
	rc := route.Config{RetryAfter: c.RetryAfter, Fallbacks: c.FallbackHosts,
		EstimateFirstToken: c.Response.EstimateFirstToken, FollowInterval: c.Response.FollowInterval, LogRequests: c.LogRequests, ModelRouting: c.Models.Routing}
	if c.PrefixAffinity.MaxExtraLoad > 0 {
		rc.Prefix = prefix.Hashing{Blocks: c.PrefixAffinity.Blocks, BlockBytes: c.PrefixAffinity.BlockBytes}
	}
	return rc
}
