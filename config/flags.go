package config

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/tokenlb/tokenlb/tokenizer"
)

// Load builds the configuration from command-line arguments: the defaults,
// then the file named by --config (if any), then the flags given, then
// validation. --help prints the flags and returns flag.ErrHelp.
func Load(name string, args []string, stderr io.Writer) (Config, error) {
	// The flags are parsed twice: first to find --config (and to print
	// help with the defaults), then over the file's values, where only the
	// flags given change anything.
	first := Default()
	fs := newFlagSet(name, &first, stderr)
	path := fs.String("config", "", "YAML configuration file (see deploy/tokenlb.yaml)")
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
	fs = newFlagSet(name, &c, io.Discard)
	fs.String("config", "", "")
	if err := fs.Parse(args); err != nil {
		return Config{}, err
	}
	return c, c.Validate()
}

// FilePath returns the configuration file that args name (--config), or
// "" when they name none or do not parse.
func FilePath(args []string) string {
	var c Config
	fs := newFlagSet("", &c, io.Discard)
	path := fs.String("config", "", "")
	if fs.Parse(args) != nil {
		return ""
	}
	return *path
}

// newFlagSet returns a flag set whose flags write straight into c's fields.
// Each flag's default is the field's value when it is bound, so binding
// changes nothing and parsing changes only the fields of the flags given.
func newFlagSet(name string, c *Config, output io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(output)
	bind(fs, c)
	return fs
}

// bind registers every flag, each on the one field it sets.
func bind(fs *flag.FlagSet, c *Config) {
	fs.StringVar(&c.Listen, "listen", c.Listen, "ext_proc gRPC listen address")
	fs.StringVar(&c.Discovery.Source, "discovery", c.Discovery.Source, "where the hosts come from: static (the hosts, followed as the file changes), dns or kubernetes")
	fs.StringVar(&c.Discovery.DNS.Name, "dns-name", c.Discovery.DNS.Name, "dns discovery: `name:port` whose A and AAAA records are the hosts")
	fs.DurationVar(&c.Discovery.DNS.Interval, "dns-interval", c.Discovery.DNS.Interval, "dns discovery: how often the name is resolved")
	k := &c.Discovery.Kubernetes
	fs.StringVar(&k.Namespace, "k8s-namespace", k.Namespace, "kubernetes discovery: the pool's or Service's namespace, \"\" for tokenlb's own")
	fs.StringVar(&k.InferencePool, "inference-pool", k.InferencePool, "kubernetes discovery: the InferencePool whose ready pods are the hosts")
	fs.StringVar(&k.Service, "k8s-service", k.Service, "kubernetes discovery: the Service whose ready endpoints are the hosts")
	fs.StringVar(&k.Port, "k8s-port", k.Port, "kubernetes discovery: the Service's port (name or number), \"\" when it has one")
	fs.StringVar(&k.Kubeconfig, "kubeconfig", k.Kubeconfig, "kubernetes discovery: a kubeconfig file, \"\" for the pod's service account")
	fs.StringVar(&c.Discovery.DNS.Server, "dns-server", c.Discovery.DNS.Server, "dns discovery: DNS server `ip:port` to ask, \"\" for the system's")
	fs.StringVar(&c.TLS.CertFile, "tls-cert-file", c.TLS.CertFile, "ext_proc listener's TLS certificate chain (PEM); turns TLS on")
	fs.StringVar(&c.TLS.KeyFile, "tls-key-file", c.TLS.KeyFile, "ext_proc listener's TLS private key (PEM)")
	fs.StringVar(&c.TLS.ClientCAFile, "tls-client-ca-file", c.TLS.ClientCAFile, "CA bundle (PEM) clients' certificates must chain to: mutual TLS")
	fs.BoolVar(&c.TLS.SelfSigned, "tls-self-signed", c.TLS.SelfSigned, "serve the ext_proc listener's TLS with a certificate generated at start (clients skip verifying it)")
	fs.BoolVar(&c.TLS.AllowPlaintext, "tls-allow-plaintext", c.TLS.AllowPlaintext, "serve the ext_proc listener without TLS on a non-loopback address")
	fs.StringVar(&c.Admin, "admin", c.Admin, "admin HTTP listen address (/metrics, /healthz, /readyz, /debug/hosts)")
	fs.BoolVar(&c.AdminPprof, "admin-pprof", c.AdminPprof, "serve Go's profiles (net/http/pprof) under /debug/pprof/ on the admin address; they expose internals and cost CPU when used")
	fs.Var((*hostList)(&c.Hosts), "hosts", "comma-separated backend `ip:port` list (replaces the file's hosts)")
	fs.StringVar(&c.Encoding, "encoding", c.Encoding, "tiktoken encoding: "+strings.Join(tokenizer.Encodings, " or "))
	bindTokenizer(fs, &c.Tokenizer)
	fs.StringVar(&c.DestinationHeader, "destination-header", c.DestinationHeader, "header carrying the chosen host")
	fs.BoolVar(&c.DestinationList, "destination-list", c.DestinationList, "destination header carries the metadata's whole list (Endpoint Picker Protocol gateways), not the chosen host alone (ORIGINAL_DST)")
	fs.IntVar(&c.FallbackHosts, "fallback-hosts", c.FallbackHosts, "other hosts listed after the chosen one in the envoy.lb metadata, for retries")
	fs.Int64Var(&c.MaxBodyBytes, "max-body-bytes", c.MaxBodyBytes, "largest request body accepted")
	fs.Int64Var(&c.MaxInFlightTokensPerHost, "max-in-flight-tokens-per-host", c.MaxInFlightTokensPerHost, "per-host in-flight token cap, 0 for none (429 when every host is at it)")
	fs.DurationVar(&c.RetryAfter, "retry-after", c.RetryAfter, "retry-after sent with the 429 when every host is at its cap")
	fs.DurationVar(&c.LeaseTTL, "lease-ttl", c.LeaseTTL, "age at which the sweeper reclaims an unreleased charge")
	fs.DurationVar(&c.SweepInterval, "sweep-interval", c.SweepInterval, "how often the sweeper runs")
	fs.DurationVar(&c.ShutdownDelay, "shutdown-delay", c.ShutdownDelay, "time reported not-ready before draining on SIGTERM")
	fs.DurationVar(&c.DrainTimeout, "drain-timeout", c.DrainTimeout, "longest drain on SIGTERM: serving until no request is being routed")
	bindCost(fs, &c.Cost)
	fs.BoolVar(&c.Response.Observer, "observer", c.Response.Observer, "an observability-mode ext_proc filter reports responses")
	fs.StringVar(&c.Response.LeaseHeader, "lease-header", c.Response.LeaseHeader, "header that lets the observer find the request")
	fs.DurationVar(&c.Response.ObserverGrace, "observer-grace", c.Response.ObserverGrace, "wait for the observer to claim a request after its response headers")
	fs.IntVar(&c.LogRequests, "log-requests", c.LogRequests, "log each routed request at info as it ends: 0 none, 1 all, N one success in N and every failure")
	fs.DurationVar(&c.Response.FollowInterval, "follow-interval", c.Response.FollowInterval, "follow a streamed response to its end, for its usage, once per host per interval (0: every one, negative: none)")
	fs.BoolVar(&c.Response.EstimateFirstToken, "estimate-first-token", c.Response.EstimateFirstToken, "release prefill load at the estimated first token")
	bindBackends(fs, c)
	bindPrefixAffinity(fs, &c.PrefixAffinity)
	fs.StringVar(&c.LogLevel, "log-level", c.LogLevel, "debug, info, warn or error")
	fs.StringVar(&c.LogFormat, "log-format", c.LogFormat, "text or json")
}

func bindTokenizer(fs *flag.FlagSet, t *Tokenizer) {
	fs.StringVar(&t.Engine, "tokenizer-engine", t.Engine, "token counter: "+strings.Join(tokenizer.Engines, " or "))
	fs.IntVar(&t.CacheEntries, "tokenizer-cache-entries", t.CacheEntries, "bound of the cache of counts of repeated texts, 0 for none")
	fs.IntVar(&t.CacheMinBytes, "tokenizer-cache-min-bytes", t.CacheMinBytes, "shortest text cached")
	fs.IntVar(&t.ExactBytes, "tokenizer-exact-bytes", t.ExactBytes, "text per request counted exactly; the rest is estimated from a sample")
	fs.DurationVar(&t.TimeLimit, "tokenizer-time-limit", t.TimeLimit, "counting time per request; the rest is estimated")
}

func bindCost(fs *flag.FlagSet, c *Cost) {
	fs.BoolVar(&c.TwoPhase, "two-phase", c.TwoPhase, "release prefill load at the first token, decode load at the end")
	fs.BoolVar(&c.EstimateOutput, "estimate-output", c.EstimateOutput, "learn output lengths from responses' usage")
	fs.BoolVar(&c.Calibrate, "calibrate", c.Calibrate, "learn each host's token ratio and speeds")
	fs.Float64Var(&c.DecodeWeight, "decode-weight", c.DecodeWeight, "share of expected decode time charged (0 to 1)")
	fs.Float64Var(&c.StallWeight, "stall-weight", c.StallWeight, "weight of the stall a prompt's prefill imposes on a host's decoding requests (0 to 1)")
	fs.IntVar(&c.OutputTokens, "output-tokens", c.OutputTokens, "prior output length")
	fs.Float64Var(&c.PrefillTokensPerSecond, "prefill-tokens-per-second", c.PrefillTokensPerSecond, "prior prefill speed")
	fs.Float64Var(&c.DecodeTokensPerSecond, "decode-tokens-per-second", c.DecodeTokensPerSecond, "prior decode speed per sequence")
}

func bindBackends(fs *flag.FlagSet, c *Config) {
	h, o := &c.HealthCheck, &c.OutlierDetection
	fs.DurationVar(&h.Interval, "health-check-interval", h.Interval, "active health check interval, 0 for none")
	fs.StringVar(&h.Path, "health-check-path", h.Path, "path of the active health check")
	fs.DurationVar(&h.Timeout, "health-check-timeout", h.Timeout, "timeout of one health check")
	fs.IntVar(&h.UnhealthyThreshold, "unhealthy-threshold", h.UnhealthyThreshold, "failed health checks in a row that eject a host")
	fs.IntVar(&h.HealthyThreshold, "healthy-threshold", h.HealthyThreshold, "passed health checks in a row that readmit it")
	fs.IntVar(&o.Consecutive5xx, "consecutive-5xx", o.Consecutive5xx, "5xx responses in a row that eject a host, 0 for no passive ejection")
	fs.DurationVar(&o.BaseEjectionTime, "base-ejection-time", o.BaseEjectionTime, "first ejection's length, doubled for each in a row")
	fs.DurationVar(&o.MaxEjectionTime, "max-ejection-time", o.MaxEjectionTime, "longest ejection")
	fs.IntVar(&o.MaxEjectionPercent, "max-ejection-percent", o.MaxEjectionPercent, "most hosts ejected passively at once, in per cent (at least one)")
	fs.BoolVar(&c.Models.Routing, "model-routing", c.Models.Routing, "send requests only to hosts serving their model (404 when none does)")
	fs.DurationVar(&c.Models.DiscoveryInterval, "model-discovery-interval", c.Models.DiscoveryInterval, "how often hosts are asked for their models, 0 for never")
	fs.StringVar(&c.BackendMetrics.Path, "backend-metrics-path", c.BackendMetrics.Path, "path of each backend's Prometheus metrics")
	fs.DurationVar(&c.BackendMetrics.Interval, "backend-metrics-interval", c.BackendMetrics.Interval, "how often each backend's engine metrics are read, 0 for never")
}

func bindPrefixAffinity(fs *flag.FlagSet, a *PrefixAffinity) {
	fs.DurationVar(&a.MaxExtraLoad, "prefix-max-extra-load", a.MaxExtraLoad, "extra queued work a host holding the prompt's prefix may have and still be chosen, 0 for no prefix affinity")
	fs.IntVar(&a.BlockBytes, "prefix-block-bytes", a.BlockBytes, "bytes of prompt per prefix hash")
	fs.IntVar(&a.Blocks, "prefix-blocks", a.Blocks, "leading blocks of the prompt hashed")
	fs.DurationVar(&a.TTL, "prefix-ttl", a.TTL, "how long a host counts as holding a prefix it served")
	fs.IntVar(&a.Entries, "prefix-entries", a.Entries, "bound of the prefix table")
}

// hostList is the --hosts flag: a comma-separated list of addresses that
// replaces the hosts (and their models) of the file.
type hostList []Host

func (l *hostList) String() string {
	if l == nil {
		return ""
	}
	addrs := make([]string, len(*l))
	for i, h := range *l {
		addrs[i] = h.Address
	}
	return strings.Join(addrs, ",")
}

func (l *hostList) Set(s string) error {
	*l = nil
	for _, h := range strings.Split(s, ",") {
		if h = strings.TrimSpace(h); h != "" {
			*l = append(*l, Host{Address: h})
		}
	}
	return nil
}
