// Package config loads and validates tokenlb's configuration: a YAML file
// (deploy/tokenlb.yaml documents every field) with command-line flags on top.
package config

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/tokenlb/tokenlb/backend"
	"github.com/tokenlb/tokenlb/cost"
	"github.com/tokenlb/tokenlb/picker"
	"github.com/tokenlb/tokenlb/processor"
	"github.com/tokenlb/tokenlb/tokenizer"
)

// Config is tokenlb's whole configuration.
type Config struct {
	// Listen is the ext_proc gRPC address Envoy connects to.
	Listen string `yaml:"listen"`
	// Admin is the HTTP address of /metrics, /healthz, /readyz and
	// /debug/hosts.
	Admin string `yaml:"admin"`
	// Hosts are the backends, each a literal ip:port.
	Hosts []Host `yaml:"hosts"`
	// Encoding is the tiktoken encoding used to count tokens.
	Encoding string `yaml:"encoding"`
	// Tokenizer says how tokens are counted.
	Tokenizer Tokenizer `yaml:"tokenizer"`
	// DestinationHeader is the header (and envoy.lb metadata key) that
	// carries the chosen host.
	DestinationHeader string `yaml:"destination_header"`
	// FallbackHosts is how many other hosts, least loaded first, follow the
	// chosen one in the envoy.lb destination metadata, for Envoy's
	// override_host policy to retry on when the chosen host is down.
	FallbackHosts int `yaml:"fallback_hosts"`
	// MaxBodyBytes is the largest request body accepted (413 above).
	MaxBodyBytes int64 `yaml:"max_body_bytes"`
	// MaxInFlightTokensPerHost caps each host's in-flight tokens; 0 means
	// no cap. When every host is at the cap, requests get 503.
	MaxInFlightTokensPerHost int64 `yaml:"max_in_flight_tokens_per_host"`
	// RetryAfter is the retry-after sent with 503.
	RetryAfter time.Duration `yaml:"retry_after"`
	// LeaseTTL is how old an unreleased charge must be before the sweeper
	// reclaims it; longer than any request can last.
	LeaseTTL time.Duration `yaml:"lease_ttl"`
	// SweepInterval is how often the sweeper runs.
	SweepInterval time.Duration `yaml:"sweep_interval"`
	// ShutdownDelay is how long tokenlb reports not-ready before it stops
	// accepting streams, so that health checks notice first.
	ShutdownDelay time.Duration `yaml:"shutdown_delay"`
	// DrainTimeout bounds how long in-flight streams may take to finish
	// after shutdown begins.
	DrainTimeout time.Duration `yaml:"drain_timeout"`
	// Cost is the cost model: what a request charges each host, and what
	// tokenlb learns from responses.
	Cost Cost `yaml:"cost"`
	// Response says how tokenlb sees responses.
	Response Response `yaml:"response"`
	// HealthCheck configures active health checks.
	HealthCheck HealthCheck `yaml:"health_check"`
	// OutlierDetection configures passive ejection on failed responses.
	OutlierDetection OutlierDetection `yaml:"outlier_detection"`
	// Models configures model-aware routing.
	Models Models `yaml:"models"`
	// BackendMetrics configures reading each backend's engine queue.
	BackendMetrics BackendMetrics `yaml:"backend_metrics"`
	// PrefixAffinity configures prefix affinity.
	PrefixAffinity PrefixAffinity `yaml:"prefix_affinity"`
	// LogLevel is debug, info, warn or error.
	LogLevel string `yaml:"log_level"`
	// LogFormat is text or json.
	LogFormat string `yaml:"log_format"`
}

// Cost configures the cost model (package cost documents it).
type Cost struct {
	// TwoPhase releases a request's prefill load at its first token and
	// its decode load at its end; off holds both until the end.
	TwoPhase bool `yaml:"two_phase"`
	// EstimateOutput learns each model's output length from responses'
	// usage; off expects max_tokens, or OutputTokens without one.
	EstimateOutput bool `yaml:"estimate_output"`
	// Calibrate learns each host's token ratio and speeds; off charges
	// every host at the prior speeds.
	Calibrate bool `yaml:"calibrate"`
	// DecodeWeight is the share of a request's expected decode time
	// charged to its host (0 charges prompts only).
	DecodeWeight float64 `yaml:"decode_weight"`
	// StallWeight steers long prompts away from hosts with many decoding
	// requests, which a prefill stalls (0 leaves it out).
	StallWeight float64 `yaml:"stall_weight"`
	// OutputTokens is the prior output length.
	OutputTokens int `yaml:"output_tokens"`
	// PrefillTokensPerSecond and DecodeTokensPerSecond (per sequence) are
	// the prior host speeds.
	PrefillTokensPerSecond float64 `yaml:"prefill_tokens_per_second"`
	DecodeTokensPerSecond  float64 `yaml:"decode_tokens_per_second"`
}

// Options returns the cost model options.
func (c Cost) Options() cost.Options {
	return cost.Options{TwoPhase: c.TwoPhase, EstimateOutput: c.EstimateOutput, Calibrate: c.Calibrate,
		DecodeWeight: c.DecodeWeight, OutputTokens: c.OutputTokens,
		PrefillTokensPerSecond: c.PrefillTokensPerSecond, DecodeTokensPerSecond: c.DecodeTokensPerSecond}
}

// Tokenizer configures token counting (package tokenizer documents it).
type Tokenizer struct {
	// Engine is fast (tokenlb's own counter) or tiktoken (tiktoken-go,
	// the reference it is tested against); both count the same.
	Engine string `yaml:"engine"`
	// CacheEntries bounds the cache of counts of repeated texts; 0 turns
	// it off. Texts shorter than CacheMinBytes are not cached.
	CacheEntries  int `yaml:"cache_entries"`
	CacheMinBytes int `yaml:"cache_min_bytes"`
	// ExactBytes and TimeLimit bound exact counting per request; past
	// either, the rest of the request is estimated from a part counted
	// exactly.
	ExactBytes int           `yaml:"exact_bytes"`
	TimeLimit  time.Duration `yaml:"time_limit"`
}

// Options returns the tokenizer options for encoding; prefix hashing is on
// when prefix affinity is.
func (t Tokenizer) Options(encoding string, prefix PrefixAffinity) tokenizer.Options {
	entries := t.CacheEntries
	if entries == 0 {
		entries = -1 // off
	}
	o := tokenizer.Options{Encoding: encoding, Engine: t.Engine, CacheEntries: entries,
		CacheMinBytes: t.CacheMinBytes, ExactBytes: t.ExactBytes, TimeLimit: t.TimeLimit}
	if prefix.MaxExtraLoad > 0 {
		o.PrefixBlocks, o.PrefixBlockBytes = prefix.Blocks, prefix.BlockBytes
	}
	return o
}

// Response says how tokenlb learns of a response's first token and end.
type Response struct {
	// Observer says an observability-mode ext_proc filter after the
	// routing one reports responses (deploy/envoy.yaml sets one up).
	Observer bool `yaml:"observer"`
	// LeaseHeader is the header that lets the observer find the request.
	LeaseHeader string `yaml:"lease_header"`
	// ObserverGrace is how long a request waits, after its response
	// headers, for the observer to claim it before it is released.
	ObserverGrace time.Duration `yaml:"observer_grace"`
	// EstimateFirstToken releases the prefill load when the host should
	// have prefilled the request, without seeing the first token.
	EstimateFirstToken bool `yaml:"estimate_first_token"`
}

// HealthCheck configures active health checks (package backend).
// Its fields are backend.HealthCheck's, in the same order: each converts
// to the other.
type HealthCheck struct {
	Path               string        `yaml:"path"`
	Interval           time.Duration `yaml:"interval"` // 0 turns them off
	Timeout            time.Duration `yaml:"timeout"`
	UnhealthyThreshold int           `yaml:"unhealthy_threshold"`
	HealthyThreshold   int           `yaml:"healthy_threshold"`
}

// OutlierDetection configures passive ejection (package backend).
type OutlierDetection struct {
	Consecutive5xx     int           `yaml:"consecutive_5xx"` // 0 turns it off
	BaseEjectionTime   time.Duration `yaml:"base_ejection_time"`
	MaxEjectionTime    time.Duration `yaml:"max_ejection_time"`
	MaxEjectionPercent int           `yaml:"max_ejection_percent"`
}

// Models configures model-aware routing.
type Models struct {
	// Routing sends a request only to hosts that serve its model, and
	// answers 404 when none does.
	Routing bool `yaml:"routing"`
	// DiscoveryInterval is how often each host without configured models
	// is asked for its model list (GET /v1/models); 0 never.
	DiscoveryInterval time.Duration `yaml:"discovery_interval"`
}

// BackendMetrics configures reading each host's engine metrics.
type BackendMetrics struct {
	Path     string        `yaml:"path"`
	Interval time.Duration `yaml:"interval"` // 0 turns it off
}

// PrefixAffinity configures prefix affinity (package picker).
type PrefixAffinity struct {
	// MaxExtraLoad is how much more expected work than the least-loaded
	// host a host that recently served the prompt's prefix may have and
	// still get the request; 0 turns affinity off.
	MaxExtraLoad time.Duration `yaml:"max_extra_load"`
	BlockBytes   int           `yaml:"block_bytes"`
	Blocks       int           `yaml:"blocks"`
	TTL          time.Duration `yaml:"ttl"`
	Entries      int           `yaml:"entries"`
}

// Host is one backend.
type Host struct {
	Address string `yaml:"address"`
	// Models are the models the host serves; empty means discover them
	// (or, with discovery off, any model).
	Models []string `yaml:"models"`
}

// Default returns the configuration used for fields a file leaves out.
func Default() Config {
	return Config{
		Listen:   "127.0.0.1:9002",
		Admin:    "127.0.0.1:9090",
		Encoding: "cl100k_base",
		Tokenizer: Tokenizer{Engine: tokenizer.DefaultEngine, CacheEntries: tokenizer.DefaultCacheEntries,
			CacheMinBytes: tokenizer.DefaultCacheMinBytes, ExactBytes: tokenizer.DefaultExactBytes,
			TimeLimit: tokenizer.DefaultTimeLimit},
		DestinationHeader: processor.DefaultDestinationHeader,
		FallbackHosts:     2,
		MaxBodyBytes:      processor.DefaultMaxBodyBytes,
		RetryAfter:        processor.DefaultRetryAfter,
		LeaseTTL:          time.Hour,
		SweepInterval:     time.Minute,
		DrainTimeout:      30 * time.Second,
		Cost: Cost{TwoPhase: true, EstimateOutput: true, Calibrate: true, DecodeWeight: cost.DefaultDecodeWeight,
			OutputTokens: cost.DefaultOutputTokens, PrefillTokensPerSecond: cost.DefaultPrefillTokensPerSecond,
			DecodeTokensPerSecond: cost.DefaultDecodeTokensPerSecond},
		Response: Response{Observer: true, LeaseHeader: processor.DefaultLeaseHeader,
			ObserverGrace: processor.DefaultObserverGrace},
		HealthCheck: HealthCheck(backend.DefaultHealth),
		OutlierDetection: OutlierDetection{Consecutive5xx: backend.DefaultOutlier.ConsecutiveFailures,
			BaseEjectionTime: backend.DefaultOutlier.BaseEjection, MaxEjectionTime: backend.DefaultOutlier.MaxEjection,
			MaxEjectionPercent: backend.DefaultOutlier.MaxEjectionPercent},
		Models: Models{Routing: true, DiscoveryInterval: backend.DefaultModels.Interval},
		// Off by default: see bench/RESULTS.md, "Two replicas".
		BackendMetrics: BackendMetrics{Path: backend.DefaultMetrics.Path},
		PrefixAffinity: PrefixAffinity{MaxExtraLoad: DefaultPrefixMaxExtraLoad, BlockBytes: tokenizer.DefaultPrefixBlockBytes,
			Blocks: DefaultPrefixBlocks, TTL: 5 * time.Minute, Entries: 1 << 16},
		LogLevel:  "info",
		LogFormat: "text",
	}
}

// Prefix affinity defaults: a host that holds the prompt's prefix may have
// up to half a second more queued work than the least-loaded one (about a
// 10,000-token prefill at the prior speed), and prompts are hashed over
// their first 32 KiB.
const (
	DefaultPrefixMaxExtraLoad = 500 * time.Millisecond
	DefaultPrefixBlocks       = 64
)

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

// Parse reads a YAML document over the defaults. Unknown fields are errors,
// so that a misspelled setting is never silently ignored.
func Parse(r io.Reader) (Config, error) {
	c := Default()
	dec := yaml.NewDecoder(r)
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil && !errors.Is(err, io.EOF) {
		return Config{}, fmt.Errorf("config: %w", err)
	}
	return c, nil
}

// HostAddresses returns the configured host addresses.
func (c *Config) HostAddresses() []string {
	out := make([]string, len(c.Hosts))
	for i, h := range c.Hosts {
		out[i] = h.Address
	}
	return out
}

// Validate checks every field and names the first bad one.
func (c *Config) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	for _, f := range []struct{ name, addr string }{{"listen", c.Listen}, {"admin", c.Admin}} {
		if _, err := netip.ParseAddrPort(f.addr); err != nil {
			bad(f.name, "%q is not an ip:port address", f.addr)
		}
	}
	if len(c.Hosts) == 0 {
		bad("hosts", "at least one host is required")
	}
	seen := map[string]int{}
	for i, h := range c.Hosts {
		addr, err := picker.ParseAddr(h.Address)
		if err != nil {
			bad(fmt.Sprintf("hosts[%d].address", i), "%q is not a literal ip:port (Envoy's ORIGINAL_DST cluster cannot resolve names)", h.Address)
			continue
		}
		if j, dup := seen[addr]; dup {
			bad(fmt.Sprintf("hosts[%d].address", i), "%s duplicates hosts[%d]", addr, j)
		}
		seen[addr] = i
	}
	known := false
	for _, e := range tokenizer.Encodings {
		known = known || e == c.Encoding
	}
	if !known {
		bad("encoding", "unknown encoding %q (want one of %s)", c.Encoding, strings.Join(tokenizer.Encodings, ", "))
	}
	if !slices.Contains(tokenizer.Engines, c.Tokenizer.Engine) {
		bad("tokenizer.engine", "unknown engine %q (want one of %s)", c.Tokenizer.Engine, strings.Join(tokenizer.Engines, ", "))
	}
	if n := c.Tokenizer.CacheEntries; n < 0 || n > 1<<24 {
		bad("tokenizer.cache_entries", "%d is outside 0 to %d", n, 1<<24)
	}
	if c.Tokenizer.CacheMinBytes <= 0 {
		bad("tokenizer.cache_min_bytes", "must be positive")
	}
	if c.Tokenizer.ExactBytes < 1<<10 {
		bad("tokenizer.exact_bytes", "%d is below 1 KiB", c.Tokenizer.ExactBytes)
	}
	if h := c.DestinationHeader; h == "" || strings.HasPrefix(h, ":") || strings.ContainsAny(h, " \t\r\n") ||
		strings.EqualFold(h, "host") || strings.HasPrefix(strings.ToLower(h), "x-envoy-") {
		bad("destination_header", "%q cannot be set by an ext_proc server", h)
	}
	if c.FallbackHosts < 0 {
		bad("fallback_hosts", "must not be negative")
	}
	if c.MaxBodyBytes <= 0 || c.MaxBodyBytes > 1<<30 {
		bad("max_body_bytes", "%d is outside 1 B to 1 GiB", c.MaxBodyBytes)
	}
	if w := c.Cost.DecodeWeight; w < 0 || w > 1 || w != w {
		bad("cost.decode_weight", "%g is outside 0 to 1", w)
	}
	if w := c.Cost.StallWeight; w < 0 || w > 1 || w != w {
		bad("cost.stall_weight", "%g is outside 0 to 1", w)
	}
	if c.Cost.OutputTokens <= 0 {
		bad("cost.output_tokens", "must be positive")
	}
	if v := c.Cost.PrefillTokensPerSecond; !(v > 0) {
		bad("cost.prefill_tokens_per_second", "must be positive")
	}
	if v := c.Cost.DecodeTokensPerSecond; !(v > 0) {
		bad("cost.decode_tokens_per_second", "must be positive")
	}
	if h := c.Response.LeaseHeader; h == "" || strings.HasPrefix(h, ":") || strings.ContainsAny(h, " \t\r\n") ||
		strings.HasPrefix(strings.ToLower(h), "x-envoy-") || strings.EqualFold(h, c.DestinationHeader) {
		bad("response.lease_header", "%q cannot be set by an ext_proc server or clashes with destination_header", h)
	}
	if c.MaxInFlightTokensPerHost < 0 {
		bad("max_in_flight_tokens_per_host", "must not be negative")
	}
	for _, d := range []struct {
		name string
		v    time.Duration
		zero bool // zero allowed
	}{{"retry_after", c.RetryAfter, false}, {"lease_ttl", c.LeaseTTL, false}, {"sweep_interval", c.SweepInterval, false},
		{"shutdown_delay", c.ShutdownDelay, true}, {"tokenizer.time_limit", c.Tokenizer.TimeLimit, false}, {"response.observer_grace", c.Response.ObserverGrace, false}, {"drain_timeout", c.DrainTimeout, true}} {
		if d.v < 0 || (d.v == 0 && !d.zero) {
			bad(d.name, "%s must be positive", d.v)
		}
	}
	if c.HealthCheck.Interval < 0 || c.HealthCheck.Interval > 0 && (c.HealthCheck.Timeout <= 0 ||
		c.HealthCheck.UnhealthyThreshold < 1 || c.HealthCheck.HealthyThreshold < 1 || !strings.HasPrefix(c.HealthCheck.Path, "/")) {
		bad("health_check", "needs a path starting with /, a positive timeout and thresholds of at least 1 (interval 0s turns checks off)")
	}
	if o := c.OutlierDetection; o.Consecutive5xx < 0 || o.Consecutive5xx > 0 && (o.BaseEjectionTime <= 0 ||
		o.MaxEjectionTime < o.BaseEjectionTime || o.MaxEjectionPercent < 1 || o.MaxEjectionPercent > 100) {
		bad("outlier_detection", "needs base_ejection_time > 0, max_ejection_time >= it and max_ejection_percent 1 to 100 (consecutive_5xx 0 turns it off)")
	}
	if c.Models.DiscoveryInterval < 0 {
		bad("models.discovery_interval", "must not be negative")
	}
	for i, h := range c.Hosts {
		for _, m := range h.Models {
			if strings.TrimSpace(m) == "" {
				bad(fmt.Sprintf("hosts[%d].models", i), "has an empty model name")
			}
		}
	}
	if b := c.BackendMetrics; b.Interval < 0 || b.Interval > 0 && !strings.HasPrefix(b.Path, "/") {
		bad("backend_metrics", "needs a path starting with / (interval 0s turns it off)")
	}
	if a := c.PrefixAffinity; a.MaxExtraLoad < 0 || a.MaxExtraLoad > 0 && (a.BlockBytes < 16 || a.Blocks < 1 || a.Blocks > 1024 ||
		a.TTL <= 0 || a.Entries < 2 || len(c.Hosts) > 64) {
		bad("prefix_affinity", "needs block_bytes >= 16, blocks 1 to 1024, a positive ttl, entries >= 2 and at most 64 hosts (max_extra_load 0s turns it off)")
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		bad("log_level", "%q is not debug, info, warn or error", c.LogLevel)
	}
	switch c.LogFormat {
	case "text", "json":
	default:
		bad("log_format", "%q is not text or json", c.LogFormat)
	}
	if len(errs) > 0 {
		return fmt.Errorf("config: %w", errors.Join(errs...))
	}
	return nil
}

// FromArgs builds the configuration from command-line arguments: the file
// named by --config (if any) over the defaults, then any flags given, then
// validation.
func FromArgs(name string, args []string, stderr io.Writer) (Config, error) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "", "YAML configuration file (see deploy/tokenlb.yaml)")
	d := Default()
	// Flags parse into a scratch copy of the defaults; only the ones given
	// are copied over the file's values.
	f := d
	var hosts string
	fs.StringVar(&f.Listen, "listen", d.Listen, "ext_proc gRPC listen address")
	fs.StringVar(&f.Admin, "admin", d.Admin, "admin HTTP listen address (/metrics, /healthz, /readyz, /debug/hosts)")
	fs.StringVar(&hosts, "hosts", "", "comma-separated backend ip:port list (replaces the file's hosts)")
	fs.StringVar(&f.Encoding, "encoding", d.Encoding, "tiktoken encoding: "+strings.Join(tokenizer.Encodings, " or "))
	fs.StringVar(&f.Tokenizer.Engine, "tokenizer-engine", d.Tokenizer.Engine, "token counter: "+strings.Join(tokenizer.Engines, " or "))
	fs.IntVar(&f.Tokenizer.CacheEntries, "tokenizer-cache-entries", d.Tokenizer.CacheEntries, "bound of the cache of counts of repeated texts, 0 for none")
	fs.IntVar(&f.Tokenizer.CacheMinBytes, "tokenizer-cache-min-bytes", d.Tokenizer.CacheMinBytes, "shortest text cached")
	fs.IntVar(&f.Tokenizer.ExactBytes, "tokenizer-exact-bytes", d.Tokenizer.ExactBytes, "text per request counted exactly; the rest is estimated from a sample")
	fs.DurationVar(&f.Tokenizer.TimeLimit, "tokenizer-time-limit", d.Tokenizer.TimeLimit, "counting time per request; the rest is estimated")
	fs.StringVar(&f.DestinationHeader, "destination-header", d.DestinationHeader, "header carrying the chosen host")
	fs.IntVar(&f.FallbackHosts, "fallback-hosts", d.FallbackHosts, "other hosts listed after the chosen one in the envoy.lb metadata, for retries")
	fs.Int64Var(&f.MaxBodyBytes, "max-body-bytes", d.MaxBodyBytes, "largest request body accepted")
	fs.Int64Var(&f.MaxInFlightTokensPerHost, "max-in-flight-tokens-per-host", d.MaxInFlightTokensPerHost, "per-host in-flight token cap, 0 for none (503 when every host is at it)")
	fs.DurationVar(&f.RetryAfter, "retry-after", d.RetryAfter, "retry-after sent with 503")
	fs.DurationVar(&f.LeaseTTL, "lease-ttl", d.LeaseTTL, "age at which the sweeper reclaims an unreleased charge")
	fs.DurationVar(&f.SweepInterval, "sweep-interval", d.SweepInterval, "how often the sweeper runs")
	fs.DurationVar(&f.ShutdownDelay, "shutdown-delay", d.ShutdownDelay, "time reported not-ready before draining on SIGTERM")
	fs.DurationVar(&f.DrainTimeout, "drain-timeout", d.DrainTimeout, "longest wait for in-flight streams on SIGTERM")
	fs.BoolVar(&f.Cost.TwoPhase, "two-phase", d.Cost.TwoPhase, "release prefill load at the first token, decode load at the end")
	fs.BoolVar(&f.Cost.EstimateOutput, "estimate-output", d.Cost.EstimateOutput, "learn output lengths from responses' usage")
	fs.BoolVar(&f.Cost.Calibrate, "calibrate", d.Cost.Calibrate, "learn each host's token ratio and speeds")
	fs.Float64Var(&f.Cost.DecodeWeight, "decode-weight", d.Cost.DecodeWeight, "share of expected decode time charged (0 to 1)")
	fs.Float64Var(&f.Cost.StallWeight, "stall-weight", d.Cost.StallWeight, "weight of the stall a prompt's prefill imposes on a host's decoding requests (0 to 1)")
	fs.IntVar(&f.Cost.OutputTokens, "output-tokens", d.Cost.OutputTokens, "prior output length")
	fs.Float64Var(&f.Cost.PrefillTokensPerSecond, "prefill-tokens-per-second", d.Cost.PrefillTokensPerSecond, "prior prefill speed")
	fs.Float64Var(&f.Cost.DecodeTokensPerSecond, "decode-tokens-per-second", d.Cost.DecodeTokensPerSecond, "prior decode speed per sequence")
	fs.BoolVar(&f.Response.Observer, "observer", d.Response.Observer, "an observability-mode ext_proc filter reports responses")
	fs.StringVar(&f.Response.LeaseHeader, "lease-header", d.Response.LeaseHeader, "header that lets the observer find the request")
	fs.DurationVar(&f.Response.ObserverGrace, "observer-grace", d.Response.ObserverGrace, "wait for the observer to claim a request after its response headers")
	fs.BoolVar(&f.Response.EstimateFirstToken, "estimate-first-token", d.Response.EstimateFirstToken, "release prefill load at the estimated first token")
	fs.DurationVar(&f.HealthCheck.Interval, "health-check-interval", d.HealthCheck.Interval, "active health check interval, 0 for none")
	fs.StringVar(&f.HealthCheck.Path, "health-check-path", d.HealthCheck.Path, "path of the active health check")
	fs.DurationVar(&f.HealthCheck.Timeout, "health-check-timeout", d.HealthCheck.Timeout, "timeout of one health check")
	fs.IntVar(&f.HealthCheck.UnhealthyThreshold, "unhealthy-threshold", d.HealthCheck.UnhealthyThreshold, "failed health checks in a row that eject a host")
	fs.IntVar(&f.HealthCheck.HealthyThreshold, "healthy-threshold", d.HealthCheck.HealthyThreshold, "passed health checks in a row that readmit it")
	fs.DurationVar(&f.OutlierDetection.MaxEjectionTime, "max-ejection-time", d.OutlierDetection.MaxEjectionTime, "longest ejection")
	fs.IntVar(&f.OutlierDetection.MaxEjectionPercent, "max-ejection-percent", d.OutlierDetection.MaxEjectionPercent, "most hosts ejected passively at once, in per cent (at least one)")
	fs.StringVar(&f.BackendMetrics.Path, "backend-metrics-path", d.BackendMetrics.Path, "path of each backend's Prometheus metrics")
	fs.IntVar(&f.PrefixAffinity.BlockBytes, "prefix-block-bytes", d.PrefixAffinity.BlockBytes, "bytes of prompt per prefix hash")
	fs.IntVar(&f.PrefixAffinity.Blocks, "prefix-blocks", d.PrefixAffinity.Blocks, "leading blocks of the prompt hashed")
	fs.DurationVar(&f.PrefixAffinity.TTL, "prefix-ttl", d.PrefixAffinity.TTL, "how long a host counts as holding a prefix it served")
	fs.IntVar(&f.PrefixAffinity.Entries, "prefix-entries", d.PrefixAffinity.Entries, "bound of the prefix table")
	fs.IntVar(&f.OutlierDetection.Consecutive5xx, "consecutive-5xx", d.OutlierDetection.Consecutive5xx, "5xx responses in a row that eject a host, 0 for no passive ejection")
	fs.DurationVar(&f.OutlierDetection.BaseEjectionTime, "base-ejection-time", d.OutlierDetection.BaseEjectionTime, "first ejection's length, doubled for each in a row")
	fs.BoolVar(&f.Models.Routing, "model-routing", d.Models.Routing, "send requests only to hosts serving their model (404 when none does)")
	fs.DurationVar(&f.Models.DiscoveryInterval, "model-discovery-interval", d.Models.DiscoveryInterval, "how often hosts are asked for their models, 0 for never")
	fs.DurationVar(&f.BackendMetrics.Interval, "backend-metrics-interval", d.BackendMetrics.Interval, "how often each backend's engine metrics are read, 0 for never")
	fs.DurationVar(&f.PrefixAffinity.MaxExtraLoad, "prefix-max-extra-load", d.PrefixAffinity.MaxExtraLoad, "extra queued work a host holding the prompt's prefix may have and still be chosen, 0 for no prefix affinity")
	fs.StringVar(&f.LogLevel, "log-level", d.LogLevel, "debug, info, warn or error")
	fs.StringVar(&f.LogFormat, "log-format", d.LogFormat, "text or json")
	if err := fs.Parse(args); err != nil {
		return Config{}, err
	}
	if fs.NArg() > 0 {
		return Config{}, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	c := Default()
	if *path != "" {
		b, err := os.ReadFile(*path)
		if err != nil {
			return Config{}, fmt.Errorf("config: %w", err)
		}
		if c, err = Parse(bytes.NewReader(b)); err != nil {
			return Config{}, fmt.Errorf("%s: %w", *path, err)
		}
	}
	fs.Visit(func(fl *flag.Flag) {
		switch fl.Name {
		case "listen":
			c.Listen = f.Listen
		case "admin":
			c.Admin = f.Admin
		case "hosts":
			c.Hosts = nil
			for _, h := range strings.Split(hosts, ",") {
				if h = strings.TrimSpace(h); h != "" {
					c.Hosts = append(c.Hosts, Host{Address: h})
				}
			}
		case "encoding":
			c.Encoding = f.Encoding
		case "tokenizer-engine":
			c.Tokenizer.Engine = f.Tokenizer.Engine
		case "tokenizer-cache-entries":
			c.Tokenizer.CacheEntries = f.Tokenizer.CacheEntries
		case "tokenizer-cache-min-bytes":
			c.Tokenizer.CacheMinBytes = f.Tokenizer.CacheMinBytes
		case "tokenizer-exact-bytes":
			c.Tokenizer.ExactBytes = f.Tokenizer.ExactBytes
		case "tokenizer-time-limit":
			c.Tokenizer.TimeLimit = f.Tokenizer.TimeLimit
		case "destination-header":
			c.DestinationHeader = f.DestinationHeader
		case "fallback-hosts":
			c.FallbackHosts = f.FallbackHosts
		case "max-body-bytes":
			c.MaxBodyBytes = f.MaxBodyBytes
		case "max-in-flight-tokens-per-host":
			c.MaxInFlightTokensPerHost = f.MaxInFlightTokensPerHost
		case "retry-after":
			c.RetryAfter = f.RetryAfter
		case "lease-ttl":
			c.LeaseTTL = f.LeaseTTL
		case "sweep-interval":
			c.SweepInterval = f.SweepInterval
		case "shutdown-delay":
			c.ShutdownDelay = f.ShutdownDelay
		case "drain-timeout":
			c.DrainTimeout = f.DrainTimeout
		case "two-phase":
			c.Cost.TwoPhase = f.Cost.TwoPhase
		case "estimate-output":
			c.Cost.EstimateOutput = f.Cost.EstimateOutput
		case "calibrate":
			c.Cost.Calibrate = f.Cost.Calibrate
		case "decode-weight":
			c.Cost.DecodeWeight = f.Cost.DecodeWeight
		case "stall-weight":
			c.Cost.StallWeight = f.Cost.StallWeight
		case "output-tokens":
			c.Cost.OutputTokens = f.Cost.OutputTokens
		case "prefill-tokens-per-second":
			c.Cost.PrefillTokensPerSecond = f.Cost.PrefillTokensPerSecond
		case "decode-tokens-per-second":
			c.Cost.DecodeTokensPerSecond = f.Cost.DecodeTokensPerSecond
		case "observer":
			c.Response.Observer = f.Response.Observer
		case "lease-header":
			c.Response.LeaseHeader = f.Response.LeaseHeader
		case "observer-grace":
			c.Response.ObserverGrace = f.Response.ObserverGrace
		case "estimate-first-token":
			c.Response.EstimateFirstToken = f.Response.EstimateFirstToken
		case "health-check-interval":
			c.HealthCheck.Interval = f.HealthCheck.Interval
		case "health-check-path":
			c.HealthCheck.Path = f.HealthCheck.Path
		case "health-check-timeout":
			c.HealthCheck.Timeout = f.HealthCheck.Timeout
		case "unhealthy-threshold":
			c.HealthCheck.UnhealthyThreshold = f.HealthCheck.UnhealthyThreshold
		case "healthy-threshold":
			c.HealthCheck.HealthyThreshold = f.HealthCheck.HealthyThreshold
		case "max-ejection-time":
			c.OutlierDetection.MaxEjectionTime = f.OutlierDetection.MaxEjectionTime
		case "max-ejection-percent":
			c.OutlierDetection.MaxEjectionPercent = f.OutlierDetection.MaxEjectionPercent
		case "backend-metrics-path":
			c.BackendMetrics.Path = f.BackendMetrics.Path
		case "prefix-block-bytes":
			c.PrefixAffinity.BlockBytes = f.PrefixAffinity.BlockBytes
		case "prefix-blocks":
			c.PrefixAffinity.Blocks = f.PrefixAffinity.Blocks
		case "prefix-ttl":
			c.PrefixAffinity.TTL = f.PrefixAffinity.TTL
		case "prefix-entries":
			c.PrefixAffinity.Entries = f.PrefixAffinity.Entries
		case "consecutive-5xx":
			c.OutlierDetection.Consecutive5xx = f.OutlierDetection.Consecutive5xx
		case "base-ejection-time":
			c.OutlierDetection.BaseEjectionTime = f.OutlierDetection.BaseEjectionTime
		case "model-routing":
			c.Models.Routing = f.Models.Routing
		case "model-discovery-interval":
			c.Models.DiscoveryInterval = f.Models.DiscoveryInterval
		case "backend-metrics-interval":
			c.BackendMetrics.Interval = f.BackendMetrics.Interval
		case "prefix-max-extra-load":
			c.PrefixAffinity.MaxExtraLoad = f.PrefixAffinity.MaxExtraLoad
		case "log-level":
			c.LogLevel = f.LogLevel
		case "log-format":
			c.LogFormat = f.LogFormat
		}
	})
	return c, c.Validate()
}
