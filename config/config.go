// Package config loads and validates tokenlb's configuration: a YAML file
// (deploy/tokenlb.yaml documents every field) with command-line flags on
// top, and turns it into each package's options.
//
// config.go is the schema and its defaults, stated once (Default);
// validate.go checks it, naming the field at fault; flags.go binds each flag
// to its field and loads the whole (Load); options.go turns settings into
// the options of the packages that use them.
package config

import (
	"errors"
	"fmt"
	"io"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/tokenlb/tokenlb/backend"
	"github.com/tokenlb/tokenlb/cost"
	"github.com/tokenlb/tokenlb/prefix"
	"github.com/tokenlb/tokenlb/processor"
	"github.com/tokenlb/tokenlb/route"
	"github.com/tokenlb/tokenlb/tokenizer"
)

// Config is tokenlb's whole configuration.
type Config struct {
	// Listen is the ext_proc gRPC address Envoy connects to.
	Listen string `yaml:"listen"`
	// TLS secures the ext_proc listener.
	TLS TLS `yaml:"tls"`
	// Admin is the HTTP address of /metrics, /healthz, /readyz and
	// /debug/hosts.
	Admin string `yaml:"admin"`
	// AdminPprof serves Go's profiles (net/http/pprof) under /debug/pprof/
	// on the admin address. Off by default: they expose the process's
	// internals, and a CPU profile or trace costs CPU while it runs.
	AdminPprof bool `yaml:"admin_pprof"`
	// Hosts are the backends, each a literal ip:port.
	Hosts []Host `yaml:"hosts"`
	// Discovery says where the hosts come from as they change.
	Discovery Discovery `yaml:"discovery"`
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
	// DestinationList puts the same list in the destination header as in
	// the metadata (the chosen host, then the fallbacks), as gateways that
	// implement the Endpoint Picker Protocol read it; false keeps the
	// chosen host alone in the header, as Envoy's ORIGINAL_DST needs.
	DestinationList bool `yaml:"destination_list"`
	// MaxBodyBytes is the largest request body accepted (413 above).
	MaxBodyBytes int64 `yaml:"max_body_bytes"`
	// MaxInFlightTokensPerHost caps each host's in-flight tokens; 0 means
	// no cap. When every host is at the cap, requests get 429.
	MaxInFlightTokensPerHost int64 `yaml:"max_in_flight_tokens_per_host"`
	// RetryAfter is the retry-after sent with the 429 of no capacity.
	RetryAfter time.Duration `yaml:"retry_after"`
	// LeaseTTL is how old an unreleased charge must be before the sweeper
	// reclaims it; longer than any request can last.
	LeaseTTL time.Duration `yaml:"lease_ttl"`
	// SweepInterval is how often the sweeper runs.
	SweepInterval time.Duration `yaml:"sweep_interval"`
	// ShutdownDelay is how long tokenlb reports not-ready before it
	// drains, so that health checks move new streams to other replicas
	// first.
	ShutdownDelay time.Duration `yaml:"shutdown_delay"`
	// DrainTimeout bounds the drain: how long tokenlb keeps serving, after
	// ShutdownDelay, for the requests being routed to finish.
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
	// LogRequests logs a line at info for each routed request as it ends
	// (route.Config.LogRequests): 0 none, 1 every one, N one successful
	// request in N and every failed one; with it on, rejections are logged
	// at info too.
	LogRequests int `yaml:"log_requests"`
}

// Discovery says where the hosts come from.
type Discovery struct {
	// Source is "static" (Hosts, followed as the file changes and on
	// SIGHUP), "dns" (DNS.Name's addresses) or "kubernetes" (an
	// InferencePool's or a Service's ready endpoints); with the last two
	// Hosts is left empty.
	Source     string     `yaml:"source"`
	DNS        DNS        `yaml:"dns"`
	Kubernetes Kubernetes `yaml:"kubernetes"`
}

// Kubernetes is the kubernetes source's setting: exactly one of
// InferencePool and Service.
type Kubernetes struct {
	// Namespace holds the pool or Service; "" is tokenlb's own (its
	// service account's) namespace.
	Namespace string `yaml:"namespace"`
	// InferencePool names an InferencePool (inference.networking.k8s.io/v1):
	// each ready Pod its selector matches, on each of its targetPorts.
	InferencePool string `yaml:"inference_pool"`
	// Service names a Service: the ready endpoints of its EndpointSlices.
	Service string `yaml:"service"`
	// Port is the Service's port, by name or number; "" when it has one.
	Port string `yaml:"port"`
	// Kubeconfig is a kubeconfig file, for running outside a cluster; ""
	// uses the pod's service account.
	Kubeconfig string `yaml:"kubeconfig"`
}

// DNS is the dns source's setting.
type DNS struct {
	// Name is "name:port": its A and AAAA records are the hosts.
	Name string `yaml:"name"`
	// Interval is how often it is resolved again.
	Interval time.Duration `yaml:"interval"`
	// Server is the DNS server (ip:port) asked; "" asks the system's.
	Server string `yaml:"server"`
}

// TLS secures the ext_proc listener: whoever reaches it can steer traffic
// and report responses, so only Envoy should.
type TLS struct {
	// CertFile and KeyFile are the server's certificate chain and key
	// (PEM). Setting them turns TLS on; both are read again when they
	// change.
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// ClientCAFile, when set, is the CA bundle (PEM) that a client's
	// certificate must chain to: mutual TLS, so that only Envoy connects.
	ClientCAFile string `yaml:"client_ca_file"`
	// AllowPlaintext serves the listener without TLS on an address that is
	// not loopback (inside a mesh whose sidecars encrypt, say). Without it
	// tokenlb refuses to start so; with it, it warns at start.
	AllowPlaintext bool `yaml:"allow_plaintext"`
	// SelfSigned serves TLS with a certificate generated at each start,
	// instead of CertFile and KeyFile: traffic is encrypted, but the
	// certificate proves nothing, so clients skip verifying it (as
	// gateways do with an Endpoint Picker's default certificate).
	SelfSigned bool `yaml:"self_signed"`
}

// Enabled reports whether the listener serves TLS.
func (t TLS) Enabled() bool { return t.CertFile != "" || t.SelfSigned }

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
	// FollowInterval: a successful streamed response is followed past its
	// first token to its end, for its usage, when its host had none
	// followed within FollowInterval (route.Config.FollowInterval); 0
	// follows every one, a negative interval none.
	FollowInterval time.Duration `yaml:"follow_interval"`
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

// PrefixAffinity configures prefix affinity (packages picker and prefix).
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
		RetryAfter:        route.DefaultRetryAfter,
		Discovery:         Discovery{Source: "static", DNS: DNS{Interval: 5 * time.Second}},
		LeaseTTL:          time.Hour,
		SweepInterval:     time.Minute,
		DrainTimeout:      30 * time.Second,
		Cost: Cost{TwoPhase: true, EstimateOutput: true, Calibrate: true, DecodeWeight: cost.DefaultDecodeWeight,
			OutputTokens: cost.DefaultOutputTokens, PrefillTokensPerSecond: cost.DefaultPrefillTokensPerSecond,
			DecodeTokensPerSecond: cost.DefaultDecodeTokensPerSecond},
		Response: Response{Observer: true, LeaseHeader: processor.DefaultLeaseHeader,
			ObserverGrace: processor.DefaultObserverGrace, FollowInterval: route.DefaultFollowInterval},
		HealthCheck: HealthCheck(backend.DefaultHealth),
		OutlierDetection: OutlierDetection{Consecutive5xx: backend.DefaultOutlier.ConsecutiveFailures,
			BaseEjectionTime: backend.DefaultOutlier.BaseEjection, MaxEjectionTime: backend.DefaultOutlier.MaxEjection,
			MaxEjectionPercent: backend.DefaultOutlier.MaxEjectionPercent},
		Models: Models{Routing: true, DiscoveryInterval: backend.DefaultModels.Interval},
		// Off by default: see bench/RESULTS.md, "Two replicas".
		BackendMetrics: BackendMetrics{Path: backend.DefaultMetrics.Path},
		PrefixAffinity: PrefixAffinity{MaxExtraLoad: DefaultPrefixMaxExtraLoad, BlockBytes: prefix.DefaultBlockBytes,
			Blocks: DefaultPrefixBlocks, TTL: 5 * time.Minute, Entries: 1 << 16},
		LogLevel: "info", LogRequests: 1,
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

// Parse reads a YAML document over the defaults. Unknown fields are errors,
// so that a misspelled setting is never silently ignored, and so is a
// second document (after ---), which would be.
func Parse(r io.Reader) (Config, error) {
	c := Default()
	dec := yaml.NewDecoder(r)
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil && !errors.Is(err, io.EOF) {
		return Config{}, fmt.Errorf("config: %w", err)
	}
	var more yaml.Node
	if err := dec.Decode(&more); !errors.Is(err, io.EOF) {
		return Config{}, errors.New("config: a second YAML document (after ---) would be ignored: put every setting in one")
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
