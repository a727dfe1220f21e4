package config

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/tokenlb/tokenlb/picker"
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
	if len(c.Hosts) == 0 {
		p.add("hosts", "at least one host is required")
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
	if c.FallbackHosts < 0 {
		p.add("fallback_hosts", "must not be negative")
	}
	if c.MaxBodyBytes <= 0 || c.MaxBodyBytes > 1<<30 {
		p.add("max_body_bytes", "%d is outside 1 B to 1 GiB", c.MaxBodyBytes)
	}
	if c.MaxInFlightTokensPerHost < 0 {
		p.add("max_in_flight_tokens_per_host", "must not be negative")
	}
	if a := c.PrefixAffinity; a.MaxExtraLoad < 0 || a.MaxExtraLoad > 0 && (a.BlockBytes < 16 || a.Blocks < 1 || a.Blocks > 1024 ||
		a.TTL <= 0 || a.Entries < 2 || len(c.Hosts) > 64) {
		p.add("prefix_affinity", "needs block_bytes >= 16, blocks 1 to 1024, a positive ttl, entries >= 2 and at most 64 hosts (max_extra_load 0s turns it off)")
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
	if v := c.Cost.PrefillTokensPerSecond; !(v > 0) {
		p.add("cost.prefill_tokens_per_second", "must be positive")
	}
	if v := c.Cost.DecodeTokensPerSecond; !(v > 0) {
		p.add("cost.decode_tokens_per_second", "must be positive")
	}
}

func (c *Config) validateDurations(p *problems) {
	for _, d := range []struct {
		name string
		v    time.Duration
		zero bool // zero allowed
	}{{"retry_after", c.RetryAfter, false}, {"lease_ttl", c.LeaseTTL, false}, {"sweep_interval", c.SweepInterval, false},
		{"shutdown_delay", c.ShutdownDelay, true}, {"tokenizer.time_limit", c.Tokenizer.TimeLimit, false},
		{"response.observer_grace", c.Response.ObserverGrace, false}, {"drain_timeout", c.DrainTimeout, true}} {
		if d.v < 0 || (d.v == 0 && !d.zero) {
			p.add(d.name, "%s must be positive", d.v)
		}
	}
}

func (c *Config) validateBackends(p *problems) {
	if c.HealthCheck.Interval < 0 || c.HealthCheck.Interval > 0 && (c.HealthCheck.Timeout <= 0 ||
		c.HealthCheck.UnhealthyThreshold < 1 || c.HealthCheck.HealthyThreshold < 1 || !strings.HasPrefix(c.HealthCheck.Path, "/")) {
		p.add("health_check", "needs a path starting with /, a positive timeout and thresholds of at least 1 (interval 0s turns checks off)")
	}
	if o := c.OutlierDetection; o.Consecutive5xx < 0 || o.Consecutive5xx > 0 && (o.BaseEjectionTime <= 0 ||
		o.MaxEjectionTime < o.BaseEjectionTime || o.MaxEjectionPercent < 1 || o.MaxEjectionPercent > 100) {
		p.add("outlier_detection", "needs base_ejection_time > 0, max_ejection_time >= it and max_ejection_percent 1 to 100 (consecutive_5xx 0 turns it off)")
	}
	if c.Models.DiscoveryInterval < 0 {
		p.add("models.discovery_interval", "must not be negative")
	}
	if b := c.BackendMetrics; b.Interval < 0 || b.Interval > 0 && !strings.HasPrefix(b.Path, "/") {
		p.add("backend_metrics", "needs a path starting with / (interval 0s turns it off)")
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
