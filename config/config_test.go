package config

import (
	"flag"
	"io"
	"maps"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tokenlb/tokenlb/prefix"
	"github.com/tokenlb/tokenlb/tokenizer"
)

func TestExampleFileIsTheDefaults(t *testing.T) {
	f, err := os.Open("../deploy/tokenlb.yaml")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	c, err := Parse(f)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	// The example documents every field at its default, plus three hosts.
	want := Default()
	want.Hosts = []Host{{Address: "127.0.0.1:8001"}, {Address: "127.0.0.1:8002"}, {Address: "127.0.0.1:8003"}}
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("deploy/tokenlb.yaml = %+v\nwant %+v", c, want)
	}
	// Every field of Config appears in the example.
	raw, _ := os.ReadFile("../deploy/tokenlb.yaml")
	typ := reflect.TypeOf(Config{})
	for i := range typ.NumField() {
		tag := typ.Field(i).Tag.Get("yaml")
		if !strings.Contains(string(raw), "\n"+tag+":") {
			t.Errorf("deploy/tokenlb.yaml does not document %q", tag)
		}
	}
}

func TestParseDurationsAndUnknownFields(t *testing.T) {
	c, err := Parse(strings.NewReader("hosts: [{address: 10.0.0.1:80}]\nlease_ttl: 90m\ndrain_timeout: 5s\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c.LeaseTTL != 90*time.Minute || c.DrainTimeout != 5*time.Second {
		t.Fatalf("durations: %v %v", c.LeaseTTL, c.DrainTimeout)
	}
	if _, err := Parse(strings.NewReader("hosts: []\nmax_body_byte: 10\n")); err == nil || !strings.Contains(err.Error(), "max_body_byte") {
		t.Fatalf("misspelled field error = %v", err)
	}
	if _, err := Parse(strings.NewReader("")); err != nil {
		t.Fatalf("empty document: %v", err)
	}
}

func TestValidateNamesTheField(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(*Config)
		want   string
	}{
		{"bad listen", func(c *Config) { c.Listen = "localhost:9002" }, "listen:"},
		{"bad admin", func(c *Config) { c.Admin = "9090" }, "admin:"},
		{"no hosts", func(c *Config) { c.Hosts = nil }, "hosts: at least one host"},
		{"host name", func(c *Config) { c.Hosts[1].Address = "vllm-0:8000" }, "hosts[1].address"},
		{"duplicate", func(c *Config) { c.Hosts[1].Address = c.Hosts[0].Address }, "hosts[1].address: 10.0.0.1:80 duplicates hosts[0]"},
		{"encoding", func(c *Config) { c.Encoding = "gpt2" }, "encoding: unknown encoding \"gpt2\""},
		{"engine", func(c *Config) { c.Tokenizer.Engine = "regex" }, "tokenizer.engine: unknown engine \"regex\""},
		{"cache", func(c *Config) { c.Tokenizer.CacheEntries = -1 }, "tokenizer.cache_entries"},
		{"cache min", func(c *Config) { c.Tokenizer.CacheMinBytes = 0 }, "tokenizer.cache_min_bytes"},
		{"exact bytes", func(c *Config) { c.Tokenizer.ExactBytes = 10 }, "tokenizer.exact_bytes"},
		{"time limit", func(c *Config) { c.Tokenizer.TimeLimit = 0 }, "tokenizer.time_limit"},
		{"header", func(c *Config) { c.DestinationHeader = "x-envoy-original-dst-host" }, "destination_header"},
		{"body limit", func(c *Config) { c.MaxBodyBytes = 0 }, "max_body_bytes"},
		{"cap", func(c *Config) { c.MaxInFlightTokensPerHost = -1 }, "max_in_flight_tokens_per_host"},
		{"decode weight", func(c *Config) { c.Cost.DecodeWeight = 2 }, "cost.decode_weight"},
		{"prior speed", func(c *Config) { c.Cost.PrefillTokensPerSecond = 0 }, "cost.prefill_tokens_per_second"},
		{"lease header", func(c *Config) { c.Response.LeaseHeader = c.DestinationHeader }, "response.lease_header"},
		{"ttl", func(c *Config) { c.LeaseTTL = 0 }, "lease_ttl"},
		{"drain", func(c *Config) { c.DrainTimeout = -time.Second }, "drain_timeout"},
		{"log level", func(c *Config) { c.LogLevel = "verbose" }, "log_level"},
		{"log format", func(c *Config) { c.LogFormat = "xml" }, "log_format"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := Default()
			c.Hosts = []Host{{Address: "10.0.0.1:80"}, {Address: "10.0.0.2:80"}}
			tc.mutate(&c)
			err := c.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Validate() = %v, want it to mention %q", err, tc.want)
			}
		})
	}
}

// flagFields names the field (by its path in the YAML file) that each flag
// sets.
var flagFields = map[string]string{
	"listen": "listen", "admin": "admin", "admin-pprof": "admin_pprof", "hosts": "hosts", "encoding": "encoding",
	"tls-cert-file": "tls.cert_file", "tls-key-file": "tls.key_file", "tls-client-ca-file": "tls.client_ca_file",
	"tls-allow-plaintext": "tls.allow_plaintext", "tls-self-signed": "tls.self_signed",
	"destination-list": "destination_list",
	"discovery":        "discovery.source", "dns-name": "discovery.dns.name", "dns-interval": "discovery.dns.interval",
	"dns-server": "discovery.dns.server", "k8s-namespace": "discovery.kubernetes.namespace",
	"inference-pool": "discovery.kubernetes.inference_pool", "k8s-service": "discovery.kubernetes.service",
	"k8s-port": "discovery.kubernetes.port", "kubeconfig": "discovery.kubernetes.kubeconfig",
	"tokenizer-engine": "tokenizer.engine", "tokenizer-cache-entries": "tokenizer.cache_entries",
	"tokenizer-cache-min-bytes": "tokenizer.cache_min_bytes", "tokenizer-exact-bytes": "tokenizer.exact_bytes",
	"tokenizer-time-limit": "tokenizer.time_limit", "destination-header": "destination_header",
	"fallback-hosts": "fallback_hosts", "max-body-bytes": "max_body_bytes",
	"max-in-flight-tokens-per-host": "max_in_flight_tokens_per_host", "retry-after": "retry_after",
	"lease-ttl": "lease_ttl", "sweep-interval": "sweep_interval", "shutdown-delay": "shutdown_delay",
	"drain-timeout": "drain_timeout", "two-phase": "cost.two_phase", "estimate-output": "cost.estimate_output",
	"calibrate": "cost.calibrate", "decode-weight": "cost.decode_weight", "stall-weight": "cost.stall_weight",
	"output-tokens": "cost.output_tokens", "prefill-tokens-per-second": "cost.prefill_tokens_per_second",
	"decode-tokens-per-second": "cost.decode_tokens_per_second", "observer": "response.observer",
	"lease-header": "response.lease_header", "observer-grace": "response.observer_grace",
	"follow-interval":      "response.follow_interval",
	"log-requests":         "log_requests",
	"estimate-first-token": "response.estimate_first_token", "health-check-path": "health_check.path",
	"health-check-interval": "health_check.interval", "health-check-timeout": "health_check.timeout",
	"unhealthy-threshold": "health_check.unhealthy_threshold", "healthy-threshold": "health_check.healthy_threshold",
	"consecutive-5xx": "outlier_detection.consecutive_5xx", "base-ejection-time": "outlier_detection.base_ejection_time",
	"max-ejection-time": "outlier_detection.max_ejection_time", "max-ejection-percent": "outlier_detection.max_ejection_percent",
	"model-routing": "models.routing", "model-discovery-interval": "models.discovery_interval",
	"backend-metrics-path": "backend_metrics.path", "backend-metrics-interval": "backend_metrics.interval",
	"prefix-max-extra-load": "prefix_affinity.max_extra_load", "prefix-block-bytes": "prefix_affinity.block_bytes",
	"prefix-blocks": "prefix_affinity.blocks", "prefix-ttl": "prefix_affinity.ttl", "prefix-entries": "prefix_affinity.entries",
	"log-level": "log_level", "log-format": "log_format",
}

// leaves returns every leaf field of v by its YAML path.
func leaves(v reflect.Value, prefix string, out map[string]reflect.Value) {
	for i := range v.NumField() {
		f := v.Type().Field(i)
		path := prefix + f.Tag.Get("yaml")
		if f.Type.Kind() == reflect.Struct && f.Type.PkgPath() == v.Type().PkgPath() {
			leaves(v.Field(i), path+".", out) // a section
			continue
		}
		out[path] = v.Field(i)
	}
}

// TestEveryFlagSetsItsField: each flag, given a value other than the
// default, changes its own field and no other, and every field has a flag.
func TestEveryFlagSetsItsField(t *testing.T) {
	defaults := map[string]reflect.Value{}
	d := Default()
	leaves(reflect.ValueOf(d), "", defaults)
	for path := range defaults {
		if !slices.Contains(slices.Collect(maps.Values(flagFields)), path) {
			t.Errorf("field %s has no flag", path)
		}
	}
	registered := 0
	newFlagSet("tokenlb", new(Config), io.Discard).VisitAll(func(*flag.Flag) { registered++ })
	if registered != len(flagFields) {
		t.Errorf("%d flags registered, %d known to this test", registered, len(flagFields))
	}
	for name, path := range flagFields {
		var value string
		switch f := defaults[path]; f.Interface().(type) {
		case string:
			value = f.String() + "x"
		case bool:
			value = strconv.FormatBool(!f.Bool())
		case int, int64:
			value = strconv.FormatInt(f.Int()+7, 10)
		case float64:
			value = strconv.FormatFloat(f.Float()+0.25, 'g', -1, 64)
		case time.Duration:
			value = (time.Duration(f.Int()) + 3*time.Second).String()
		case []Host:
			value = "10.9.9.9:1"
		default:
			t.Fatalf("flag %s: field %s of type %s", name, path, f.Type())
		}
		c := Default()
		fs := newFlagSet("tokenlb", &c, io.Discard)
		if err := fs.Parse([]string{"--" + name + "=" + value}); err != nil {
			t.Fatalf("--%s=%s: %v", name, value, err)
		}
		got := map[string]reflect.Value{}
		leaves(reflect.ValueOf(c), "", got)
		for p, v := range got {
			if changed := !reflect.DeepEqual(v.Interface(), defaults[p].Interface()); changed != (p == path) {
				t.Errorf("--%s=%s: field %s changed: %v", name, value, p, changed)
			}
		}
	}
}

// TestCostSwitches: each piece of the cost model can be switched off in the
// file and back on with a flag.
func TestCostSwitches(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.yaml")
	doc := "hosts: [{address: 10.0.0.1:80}]\ncost: {two_phase: false, estimate_output: false, calibrate: false, decode_weight: 0.2}\n" +
		"response: {observer: true}\n"
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Load("tokenlb", []string{"--config", path, "--calibrate"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	o := c.Cost.Options()
	if o.TwoPhase || o.EstimateOutput || !o.Calibrate || o.DecodeWeight != 0.2 || !c.Response.Observer ||
		o.OutputTokens != Default().Cost.OutputTokens {
		t.Errorf("cost options = %+v, response = %+v", o, c.Response)
	}
}

// TestTokenizerOptions: the file's tokenizer section and its flags reach
// the tokenizer, and a cache of 0 entries is off.
func TestTokenizerOptions(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.yaml")
	doc := "hosts: [{address: 10.0.0.1:80}]\nencoding: o200k_base\ntokenizer: {engine: tiktoken, cache_entries: 0, exact_bytes: 2048}\n"
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Load("tokenlb", []string{"--config", path, "--tokenizer-time-limit", "5ms"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	o := c.Tokenizer.Options(c.Encoding)
	want := tokenizer.Options{Encoding: "o200k_base", Engine: "tiktoken", CacheEntries: -1,
		CacheMinBytes: tokenizer.DefaultCacheMinBytes, ExactBytes: 2048, TimeLimit: 5 * time.Millisecond}
	if o != want {
		t.Errorf("tokenizer options = %+v, want %+v", o, want)
	}
	// Prompts are hashed with prefix affinity on, and not without it.
	if h := c.Route().Prefix; h.Blocks != DefaultPrefixBlocks || h.BlockBytes != prefix.DefaultBlockBytes {
		t.Errorf("prefix hashing with affinity on: %+v", h)
	}
	c.PrefixAffinity.MaxExtraLoad = 0
	if h := c.Route().Prefix; h.Blocks != 0 {
		t.Errorf("prefix blocks hashed with affinity off: %+v", h)
	}
	if d := Default().Tokenizer.Options("cl100k_base"); d.Engine != "fast" || d.CacheEntries != tokenizer.DefaultCacheEntries {
		t.Errorf("default tokenizer options = %+v, want the fast engine with the cache on", d)
	}
}

func TestLoad(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(path, []byte("hosts: [{address: 10.0.0.1:80}]\nencoding: o200k_base\nlog_level: warn\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Load("tokenlb", []string{"--config", path, "--hosts", "10.0.0.7:81, 10.0.0.8:82", "--log-level", "debug",
		"--drain-timeout", "7s", "--max-in-flight-tokens-per-host", "5000"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.HostAddresses(); !reflect.DeepEqual(got, []string{"10.0.0.7:81", "10.0.0.8:82"}) {
		t.Errorf("hosts = %v", got)
	}
	if c.Encoding != "o200k_base" || c.LogLevel != "debug" || c.Listen != "127.0.0.1:9002" ||
		c.DrainTimeout != 7*time.Second || c.MaxInFlightTokensPerHost != 5000 || c.LeaseTTL != time.Hour {
		t.Errorf("config = %+v", c)
	}
	if _, err := Load("tokenlb", []string{"--hosts", "10.0.0.1:80", "--encoding", "nope"}, io.Discard); err == nil || !strings.Contains(err.Error(), "encoding") {
		t.Errorf("bad flag value error = %v", err)
	}
	if _, err := Load("tokenlb", []string{"--config", filepath.Join(t.TempDir(), "missing.yaml")}, io.Discard); err == nil {
		t.Error("missing config file accepted")
	}
}

// TestValidateWithoutGaps: each bad value is refused, and the error names
// its field (not its section) and says what is wrong with it.
func TestValidateWithoutGaps(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(*Config)
		want   string
	}{
		{"infinite prefill speed", func(c *Config) { c.Cost.PrefillTokensPerSecond = math.Inf(1) }, "cost.prefill_tokens_per_second: +Inf is outside"},
		{"NaN decode speed", func(c *Config) { c.Cost.DecodeTokensPerSecond = math.NaN() }, "cost.decode_tokens_per_second: NaN is outside"},
		{"implausible prefill speed", func(c *Config) { c.Cost.PrefillTokensPerSecond = 1e12 }, "cost.prefill_tokens_per_second"},
		{"lease ttl of a millisecond", func(c *Config) { c.LeaseTTL = time.Millisecond }, "lease_ttl: 1ms is below 1m0s"},
		{"host with an IPv6 zone", func(c *Config) { c.Hosts[0].Address = "[fe80::1%eth0]:8000" }, "hosts[0].address"},
		{"negative health check interval", func(c *Config) { c.HealthCheck.Interval = -time.Second }, "health_check.interval: -1s must not be negative"},
		{"health check timeout", func(c *Config) { c.HealthCheck.Timeout = 0 }, "health_check.timeout: 0s must be positive"},
		{"health check path", func(c *Config) { c.HealthCheck.Path = "health" }, `health_check.path: "health" does not start with /`},
		{"unhealthy threshold", func(c *Config) { c.HealthCheck.UnhealthyThreshold = -2 }, "health_check.unhealthy_threshold: -2 is below 1"},
		{"negative consecutive 5xx", func(c *Config) { c.OutlierDetection.Consecutive5xx = -1 }, "outlier_detection.consecutive_5xx: -1 is below 0"},
		{"ejection times", func(c *Config) { c.OutlierDetection.MaxEjectionTime = time.Second }, "outlier_detection.max_ejection_time: 1s is below base_ejection_time"},
		{"ejection percent", func(c *Config) { c.OutlierDetection.MaxEjectionPercent = 101 }, "outlier_detection.max_ejection_percent: 101 is outside"},
		{"negative extra load", func(c *Config) { c.PrefixAffinity.MaxExtraLoad = -time.Second }, "prefix_affinity.max_extra_load: -1s must not be negative"},
		{"prefix blocks", func(c *Config) { c.PrefixAffinity.Blocks = 0 }, "prefix_affinity.blocks: 0 is outside 1 to 1024"},
		{"prefix block bytes", func(c *Config) { c.PrefixAffinity.BlockBytes = 8 }, "prefix_affinity.block_bytes: 8 is below 16"},
		{"negative shutdown delay", func(c *Config) { c.ShutdownDelay = -time.Second }, "shutdown_delay: -1s must not be negative"},
		{"metrics path", func(c *Config) { c.BackendMetrics.Interval, c.BackendMetrics.Path = time.Second, "metrics" }, `backend_metrics.path: "metrics" does not start with /`},
		{"unknown discovery source", func(c *Config) { c.Discovery.Source = "consul" }, `discovery.source: "consul" is not static, dns or kubernetes`},
		{"kubernetes with hosts", func(c *Config) { c.Discovery.Source, c.Discovery.Kubernetes.Service = "kubernetes", "vllm" }, "hosts: set by discovery.kubernetes"},
		{"kubernetes names nothing", func(c *Config) { c.Discovery.Source, c.Hosts = "kubernetes", nil }, "discovery.kubernetes: names neither"},
		{"kubernetes names both", func(c *Config) {
			c.Discovery.Source, c.Hosts, c.Discovery.Kubernetes.Service, c.Discovery.Kubernetes.InferencePool = "kubernetes", nil, "vllm", "pool"
		}, "discovery.kubernetes: names both"},
		{"kubernetes pool with a port", func(c *Config) {
			c.Discovery.Source, c.Hosts, c.Discovery.Kubernetes.InferencePool, c.Discovery.Kubernetes.Port = "kubernetes", nil, "pool", "http"
		}, "discovery.kubernetes.port: is for a service"},
		{"kubernetes bad name", func(c *Config) {
			c.Discovery.Source, c.Hosts, c.Discovery.Kubernetes.Service = "kubernetes", nil, "vLLM_1"
		}, `discovery.kubernetes.service: "vLLM_1" is not a Kubernetes name`},
		{"kubernetes bad port", func(c *Config) {
			c.Discovery.Source, c.Hosts, c.Discovery.Kubernetes.Service, c.Discovery.Kubernetes.Port = "kubernetes", nil, "vllm", "70000"
		}, `discovery.kubernetes.port: "70000" is neither`},
		{"dns with hosts", func(c *Config) { c.Discovery.Source, c.Discovery.DNS.Name = "dns", "vllm:8000" }, "hosts: set by discovery.dns"},
		{"dns name without a port", func(c *Config) { c.Discovery.Source, c.Hosts, c.Discovery.DNS.Name = "dns", nil, "vllm" }, `discovery.dns.name: "vllm" is not name:port`},
		{"dns interval", func(c *Config) {
			c.Discovery.Source, c.Hosts, c.Discovery.DNS.Name, c.Discovery.DNS.Interval = "dns", nil, "vllm:8000", time.Millisecond
		}, "discovery.dns.interval: 1ms is below 100ms"},
		{"dns server", func(c *Config) {
			c.Discovery.Source, c.Hosts, c.Discovery.DNS.Name, c.Discovery.DNS.Server = "dns", nil, "vllm:8000", "dns.example:53"
		}, `discovery.dns.server: "dns.example:53" is not an ip:port`},
		{"plaintext on every interface", func(c *Config) { c.Listen = "0.0.0.0:9002" }, "listen: 0.0.0.0:9002 is reachable from other machines"},
		{"plaintext on a pod address", func(c *Config) { c.Listen = "10.1.2.3:9002" }, "tls.allow_plaintext: true"},
		{"certificate without key", func(c *Config) { c.TLS.CertFile = "config_test.go" }, "tls: cert_file and key_file go together"},
		{"client CA without TLS", func(c *Config) { c.TLS.ClientCAFile = "config_test.go" }, "tls.client_ca_file: needs tls.cert_file"},
		{"missing certificate", func(c *Config) { c.TLS.CertFile, c.TLS.KeyFile = "missing.pem", "config_test.go" }, "tls.cert_file: stat missing.pem"},
		{"plaintext allowed and TLS", func(c *Config) {
			c.TLS.CertFile, c.TLS.KeyFile, c.TLS.AllowPlaintext = "config_test.go", "config_test.go", true
		}, "tls.allow_plaintext: contradicts"},
		{"self-signed and a certificate", func(c *Config) {
			c.TLS.CertFile, c.TLS.KeyFile, c.TLS.SelfSigned = "config_test.go", "config_test.go", true
		}, "tls.self_signed: contradicts tls.cert_file"},
		{"self-signed with a client CA", func(c *Config) { c.TLS.SelfSigned, c.TLS.ClientCAFile = true, "config_test.go" }, "tls.client_ca_file: needs tls.cert_file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Default()
			c.Hosts = []Host{{Address: "10.0.0.1:80"}, {Address: "10.0.0.2:80"}}
			tc.mutate(&c)
			if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Validate() = %v, want it to say %q", err, tc.want)
			}
		})
	}
}

// TestListenersThatNeedNoTLS: loopback listeners, TLS, and plaintext the
// config allows are all accepted.
func TestListenersThatNeedNoTLS(t *testing.T) {
	for name, mutate := range map[string]func(*Config){
		"IPv4 loopback":     func(c *Config) { c.Listen = "127.0.0.1:9002" },
		"IPv6 loopback":     func(c *Config) { c.Listen = "[::1]:9002" },
		"allowed plaintext": func(c *Config) { c.Listen, c.TLS.AllowPlaintext = "0.0.0.0:9002", true },
		"self-signed":       func(c *Config) { c.Listen, c.TLS.SelfSigned = "0.0.0.0:9002", true },
		"dns discovery":     func(c *Config) { c.Discovery.Source, c.Hosts, c.Discovery.DNS.Name = "dns", nil, "vllm.llm.svc:8000" },
		"kubernetes pool": func(c *Config) {
			c.Discovery.Source, c.Hosts, c.Discovery.Kubernetes.InferencePool = "kubernetes", nil, "vllm-pool"
		},
		"kubernetes service": func(c *Config) {
			c.Discovery.Source, c.Hosts, c.Discovery.Kubernetes.Service, c.Discovery.Kubernetes.Port = "kubernetes", nil, "vllm", "http"
		},
		"mutual TLS": func(c *Config) {
			c.Listen, c.TLS.CertFile, c.TLS.KeyFile, c.TLS.ClientCAFile = "0.0.0.0:9002", "config_test.go", "config_test.go", "config_test.go"
		},
	} {
		c := Default()
		c.Hosts = []Host{{Address: "10.0.0.1:80"}}
		mutate(&c)
		if err := c.Validate(); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// TestSecondDocumentRefused: a second YAML document, whose settings would
// be ignored, is an error, whatever it holds.
func TestSecondDocumentRefused(t *testing.T) {
	for _, doc := range []string{
		"hosts: [{address: 10.0.0.1:80}]\n---\nlog_level: debug\n",
		"hosts: [{address: 10.0.0.1:80}]\n---\nno_such_field: [\n",
	} {
		if _, err := Parse(strings.NewReader(doc)); err == nil || !strings.Contains(err.Error(), "second YAML document") {
			t.Errorf("Parse(%q) = %v, want a second-document error", doc, err)
		}
	}
	if _, err := Parse(strings.NewReader("hosts: [{address: 10.0.0.1:80}]\n")); err != nil {
		t.Errorf("one document: %v", err)
	}
}
