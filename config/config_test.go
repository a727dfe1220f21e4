package config

import (
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

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

// TestEveryFieldHasAFlag keeps the flags in step with the file.
func TestEveryFieldHasAFlag(t *testing.T) {
	var usage strings.Builder
	FromArgs("tokenlb", []string{"--help"}, &usage)
	var check func(typ reflect.Type)
	check = func(typ reflect.Type) {
		for i := range typ.NumField() {
			f := typ.Field(i)
			if f.Type.Kind() == reflect.Struct && f.Type.PkgPath() == typ.PkgPath() {
				check(f.Type) // a section: its fields are flags of their own
				continue
			}
			flagName := "-" + strings.ReplaceAll(f.Tag.Get("yaml"), "_", "-")
			if !strings.Contains(usage.String(), flagName+" ") && !strings.Contains(usage.String(), flagName+"\n") {
				t.Errorf("no flag %s", flagName)
			}
		}
	}
	check(reflect.TypeOf(Config{}))
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
	c, err := FromArgs("tokenlb", []string{"--config", path, "--calibrate"}, io.Discard)
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
	c, err := FromArgs("tokenlb", []string{"--config", path, "--tokenizer-time-limit", "5ms"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	o := c.Tokenizer.Options(c.Encoding, c.PrefixAffinity)
	want := tokenizer.Options{Encoding: "o200k_base", Engine: "tiktoken", CacheEntries: -1,
		CacheMinBytes: tokenizer.DefaultCacheMinBytes, ExactBytes: 2048, TimeLimit: 5 * time.Millisecond,
		PrefixBlocks: DefaultPrefixBlocks, PrefixBlockBytes: tokenizer.DefaultPrefixBlockBytes}
	if o != want {
		t.Errorf("tokenizer options = %+v, want %+v", o, want)
	}
	// Without prefix affinity, no prompt is hashed.
	if o := c.Tokenizer.Options(c.Encoding, PrefixAffinity{}); o.PrefixBlocks != 0 {
		t.Errorf("prefix blocks hashed with affinity off: %+v", o)
	}
	if d := Default().Tokenizer.Options("cl100k_base", PrefixAffinity{}); d.Engine != "fast" || d.CacheEntries != tokenizer.DefaultCacheEntries {
		t.Errorf("default tokenizer options = %+v, want the fast engine with the cache on", d)
	}
}

func TestFromArgs(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(path, []byte("hosts: [{address: 10.0.0.1:80}]\nencoding: o200k_base\nlog_level: warn\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := FromArgs("tokenlb", []string{"--config", path, "--hosts", "10.0.0.7:81, 10.0.0.8:82", "--log-level", "debug",
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
	if _, err := FromArgs("tokenlb", []string{"--hosts", "10.0.0.1:80", "--encoding", "nope"}, io.Discard); err == nil || !strings.Contains(err.Error(), "encoding") {
		t.Errorf("bad flag value error = %v", err)
	}
	if _, err := FromArgs("tokenlb", []string{"--config", filepath.Join(t.TempDir(), "missing.yaml")}, io.Discard); err == nil {
		t.Error("missing config file accepted")
	}
}
