package config

import (
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/tokenlb/tokenlb/picker"
	"github.com/tokenlb/tokenlb/prefix"
	"github.com/tokenlb/tokenlb/tokenizer"
)

// Validate checks every field and names each bad one.
func (c *Config) Validate() error {
	var p problems
	c.validateListenersAndHosts(&p)
	c.validateTokenizer(&p)
	c.validateRouting(&p)
	c.validateCost(&p)
	c.validateDurations(&p)
	c.validateBackends(&p)
	c.validateLogs(&p)
	if len(p) > 0 {
		return fmt.Errorf("config: %w", errors.Join(p...))
	}
	return nil
}

// minLeaseTTL is the shortest lease_ttl accepted.
const minLeaseTTL = time.Minute

// problems collects what is wrong, each error naming its field.
type problems []error

func (p *problems) add(field, format string, args ...any) {
	*p = append(*p, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
}

// validateListenersAndHosts checks where tokenlb listens and the hosts it
// routes to, with their models.
func (c *Config) validateListenersAndHosts(p *problems) {
	for _, f := range []struct{ name, addr string }{{"listen", c.Listen}, {"admin", c.Admin}} {
		if _, err := netip.ParseAddrPort(f.addr); err != nil {
			p.add(f.name, "%q is not an ip:port address", f.addr)
		}
	}
	c.validateTLS(p)
	switch c.Discovery.Source {
	case "static":
		if len(c.Hosts) == 0 {
			p.add("hosts", "at least one host is required")
		}
	case "dns":
		c.validateDNS(p)
	case "kubernetes":
		c.validateKubernetes(p)
	default:
		p.add("discovery.source", "%q is not static, dns or kubernetes", c.Discovery.Source)
	}
	seen := map[string]int{}
	for i, h := range c.Hosts {
		addr, err := picker.ParseAddr(h.Address)
		if err != nil {
			p.add(fmt.Sprintf("hosts[%d].address", i), "%q is not a literal ip:port (Envoy's ORIGINAL_DST cluster cannot resolve names)", h.Address)
			continue
		}
		if j, dup := seen[addr]; dup {
			p.add(fmt.Sprintf("hosts[%d].address", i), "%s duplicates hosts[%d]", addr, j)
		}
		seen[addr] = i
	}
	for i, h := range c.Hosts {
		for _, m := range h.Models {
			if strings.TrimSpace(m) == "" {
				p.add(fmt.Sprintf("hosts[%d].models", i), "has an empty model name")
			}
		}
	}
}

// validateKubernetes checks the kubernetes source, which fills the hosts
// itself.
func (c *Config) validateKubernetes(p *problems) {
	k := c.Discovery.Kubernetes
	if len(c.Hosts) > 0 {
		p.add("hosts", "set by discovery.kubernetes; leave the list empty")
	}
	switch {
	case k.InferencePool == "" && k.Service == "":
		p.add("discovery.kubernetes", "names neither an inference_pool nor a service")
	case k.InferencePool != "" && k.Service != "":
		p.add("discovery.kubernetes", "names both an inference_pool and a service; choose one")
	case k.InferencePool != "" && k.Port != "":
		p.add("discovery.kubernetes.port", "is for a service; an inference_pool has its targetPorts")
	}
	for _, f := range []struct{ field, name string }{
		{"namespace", k.Namespace}, {"inference_pool", k.InferencePool}, {"service", k.Service},
	} {
		if f.name != "" && !dnsLabel.MatchString(f.name) {
			p.add("discovery.kubernetes."+f.field, "%q is not a Kubernetes name (lower-case letters, digits and '-')", f.name)
		}
	}
	if port, err := strconv.Atoi(k.Port); k.Port != "" && (err == nil && (port < 1 || port > 65535) || err != nil && !dnsLabel.MatchString(k.Port)) {
		p.add("discovery.kubernetes.port", "%q is neither a port number nor a port name", k.Port)
	}
}

// dnsLabel is a Kubernetes object name as Services and namespaces need it
// (RFC 1123 label; pools are DNS subdomains, which this keeps a part of).
var dnsLabel = regexp.MustCompile(`^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$`)

// validateDNS checks the dns source, which fills the hosts itself.
func (c *Config) validateDNS(p *problems) {
	d := c.Discovery.DNS
	if len(c.Hosts) > 0 {
		p.add("hosts", "set by discovery.dns; leave the list empty")
	}
	if host, port, err := net.SplitHostPort(d.Name); err != nil || host == "" || port == "" || port == "0" {
		p.add("discovery.dns.name", "%q is not name:port", d.Name)
	}
	if d.Interval < 100*time.Millisecond {
		p.add("discovery.dns.interval", "%v is below 100ms", d.Interval)
	}
	if _, err := netip.ParseAddrPort(d.Server); d.Server != "" && err != nil {
		p.add("discovery.dns.server", "%q is not an ip:port address", d.Server)
	}
}

// validateTLS checks the ext_proc listener's TLS files, and that a
// listener others can reach is not plaintext unless the config says so.
func (c *Config) validateTLS(p *problems) {
	t := c.TLS
	switch {
	case (t.CertFile == "") != (t.KeyFile == ""):
		p.add("tls", "cert_file and key_file go together")
	case t.SelfSigned && t.CertFile != "":
		p.add("tls.self_signed", "contradicts tls.cert_file")
	case t.ClientCAFile != "" && t.CertFile == "":
		p.add("tls.client_ca_file", "needs tls.cert_file and tls.key_file")
	case t.Enabled() && t.AllowPlaintext:
		p.add("tls.allow_plaintext", "contradicts TLS (tls.cert_file or tls.self_signed)")
	}
	for _, f := range []struct{ name, path string }{{"tls.cert_file", t.CertFile}, {"tls.key_file", t.KeyFile}, {"tls.client_ca_file", t.ClientCAFile}} {
		if f.path == "" {
			continue
		}
		if _, err := os.Stat(f.path); err != nil {
			p.add(f.name, "%v", err)
		}
	}
	if ap, err := netip.ParseAddrPort(c.Listen); err == nil && !ap.Addr().IsLoopback() && !t.Enabled() && !t.AllowPlaintext {
		p.add("listen", "%s is reachable from other machines, and whoever reaches it can steer traffic: set tls.cert_file, tls.key_file "+
			"and tls.client_ca_file (mutual TLS, so that only Envoy connects), or tls.self_signed (encrypted, unauthenticated), or tls.allow_plaintext: true where the network "+
			"itself is trusted (a mesh whose sidecars encrypt)", c.Listen)
	}
}

func (c *Config) validateTokenizer(p *problems) {
	if !slices.Contains(tokenizer.Encodings, c.Encoding) {
		p.add("encoding", "unknown encoding %q (want one of %s)", c.Encoding, strings.Join(tokenizer.Encodings, ", "))
	}
	if !slices.Contains(tokenizer.Engines, c.Tokenizer.Engine) {
		p.add("tokenizer.engine", "unknown engine %q (want one of %s)", c.Tokenizer.Engine, strings.Join(tokenizer.Engines, ", "))
	}
	if n := c.Tokenizer.CacheEntries; n < 0 || n > 1<<24 {
		p.add("tokenizer.cache_entries", "%d is outside 0 to %d", n, 1<<24)
	}
	if c.Tokenizer.CacheMinBytes <= 0 {
		p.add("tokenizer.cache_min_bytes", "must be positive")
	}
	if c.Tokenizer.ExactBytes < 1<<10 {
		p.add("tokenizer.exact_bytes", "%d is below 1 KiB", c.Tokenizer.ExactBytes)
	}
}

// settableHeader reports whether an ext_proc server may set header h.
func settableHeader(h string) bool {
	return h != "" && !strings.HasPrefix(h, ":") && !strings.ContainsAny(h, " \t\r\n") &&
		!strings.HasPrefix(strings.ToLower(h), "x-envoy-")
}

// validateRouting checks what shapes each request's route: the headers
// tokenlb sets, fallbacks, the body limit, the in-flight cap and prefix
// affinity.
func (c *Config) validateRouting(p *problems) {
	if h := c.DestinationHeader; !settableHeader(h) || strings.EqualFold(h, "host") {
		p.add("destination_header", "%q cannot be set by an ext_proc server", h)
	}
	if h := c.Response.LeaseHeader; !settableHeader(h) || strings.EqualFold(h, c.DestinationHeader) {
		p.add("response.lease_header", "%q cannot be set by an ext_proc server or clashes with destination_header", h)
	}
	p.atLeast("log_requests", c.LogRequests, 0)
	if c.FallbackHosts < 0 {
		p.add("fallback_hosts", "must not be negative")
	}
	if c.MaxBodyBytes <= 0 || c.MaxBodyBytes > 1<<30 {
		p.add("max_body_bytes", "%d is outside 1 B to 1 GiB", c.MaxBodyBytes)
	}
	if c.MaxInFlightTokensPerHost < 0 {
		p.add("max_in_flight_tokens_per_host", "must not be negative")
	}
	a := c.PrefixAffinity
	p.duration("prefix_affinity.max_extra_load", a.MaxExtraLoad, true)
	if a.MaxExtraLoad > 0 { // 0 turns affinity off
		p.atLeast("prefix_affinity.block_bytes", a.BlockBytes, 16)
		if a.Blocks < 1 || a.Blocks > 1024 {
			p.add("prefix_affinity.blocks", "%d is outside 1 to 1024", a.Blocks)
		}
		p.duration("prefix_affinity.ttl", a.TTL, false)
		p.atLeast("prefix_affinity.entries", a.Entries, 2)
		if len(c.Hosts) > prefix.MaxHosts {
			p.add("prefix_affinity.max_extra_load", "affinity supports at most %d hosts, not %d: set 0s to turn it off", prefix.MaxHosts, len(c.Hosts))
		}
	}
}

func (c *Config) validateCost(p *problems) {
	if w := c.Cost.DecodeWeight; w < 0 || w > 1 || w != w {
		p.add("cost.decode_weight", "%g is outside 0 to 1", w)
	}
	if w := c.Cost.StallWeight; w < 0 || w > 1 || w != w {
		p.add("cost.stall_weight", "%g is outside 0 to 1", w)
	}
	if c.Cost.OutputTokens <= 0 {
		p.add("cost.output_tokens", "must be positive")
	}
	p.rate("cost.prefill_tokens_per_second", c.Cost.PrefillTokensPerSecond, 1e9)
	p.rate("cost.decode_tokens_per_second", c.Cost.DecodeTokensPerSecond, 1e7)
}

func (c *Config) validateDurations(p *problems) {
	for _, d := range []struct {
		name string
		v    time.Duration
		zero bool // zero allowed
	}{{"retry_after", c.RetryAfter, false}, {"lease_ttl", c.LeaseTTL, false}, {"sweep_interval", c.SweepInterval, false},
		{"shutdown_delay", c.ShutdownDelay, true}, {"tokenizer.time_limit", c.Tokenizer.TimeLimit, false},
		{"response.observer_grace", c.Response.ObserverGrace, false}, {"drain_timeout", c.DrainTimeout, true}} {
		p.duration(d.name, d.v, d.zero)
	}
	// The sweeper releases whatever is older than lease_ttl: shorter than
	// a long generation, it would release requests still running.
	if c.LeaseTTL > 0 && c.LeaseTTL < minLeaseTTL {
		p.add("lease_ttl", "%s is below %s: the sweeper would release requests still running", c.LeaseTTL, minLeaseTTL)
	}
}

func (c *Config) validateBackends(p *problems) {
	h := c.HealthCheck
	p.duration("health_check.interval", h.Interval, true)
	if h.Interval > 0 { // 0 turns checks off, and the rest with them
		p.path("health_check.path", h.Path)
		p.duration("health_check.timeout", h.Timeout, false)
		p.atLeast("health_check.unhealthy_threshold", h.UnhealthyThreshold, 1)
		p.atLeast("health_check.healthy_threshold", h.HealthyThreshold, 1)
	}
	o := c.OutlierDetection
	p.atLeast("outlier_detection.consecutive_5xx", o.Consecutive5xx, 0)
	if o.Consecutive5xx > 0 { // 0 turns passive ejection off
		p.duration("outlier_detection.base_ejection_time", o.BaseEjectionTime, false)
		if o.MaxEjectionTime < o.BaseEjectionTime {
			p.add("outlier_detection.max_ejection_time", "%s is below base_ejection_time %s", o.MaxEjectionTime, o.BaseEjectionTime)
		}
		if o.MaxEjectionPercent < 1 || o.MaxEjectionPercent > 100 {
			p.add("outlier_detection.max_ejection_percent", "%d is outside 1 to 100", o.MaxEjectionPercent)
		}
	}
	p.duration("models.discovery_interval", c.Models.DiscoveryInterval, true)
	p.duration("backend_metrics.interval", c.BackendMetrics.Interval, true)
	if c.BackendMetrics.Interval > 0 { // 0 turns it off
		p.path("backend_metrics.path", c.BackendMetrics.Path)
	}
}

// duration checks a duration field: positive, or with zero allowed, not
// negative.
func (p *problems) duration(field string, d time.Duration, zero bool) {
	switch {
	case d < 0 && zero:
		p.add(field, "%s must not be negative", d)
	case d <= 0 && !zero:
		p.add(field, "%s must be positive", d)
	}
}

// atLeast checks an integer field's lower bound.
func (p *problems) atLeast(field string, v, least int) {
	if v < least {
		p.add(field, "%d is below %d", v, least)
	}
}

// path checks a URL path field.
func (p *problems) path(field, path string) {
	if !strings.HasPrefix(path, "/") {
		p.add(field, "%q does not start with /", path)
	}
}

// rate checks a per-second rate field: finite and within a plausible
// range.
func (p *problems) rate(field string, v, most float64) {
	if !(v > 0) || math.IsInf(v, 0) || v > most {
		p.add(field, "%g is outside 0 to %g (exclusive of 0)", v, most)
	}
}

func (c *Config) validateLogs(p *problems) {
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		p.add("log_level", "%q is not debug, info, warn or error", c.LogLevel)
	}
	switch c.LogFormat {
	case "text", "json":
	default:
		p.add("log_format", "%q is not text or json", c.LogFormat)
	}
}
