package bench

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"text/template"
	"time"

	"github.com/tokenlb/tokenlb/internal/proc"
)

// The llm-d arm: llm-d's endpoint picker (the EPP of
// github.com/llm-d/llm-d-router, cmd/epp; an external program at
// Options.EPP) in its file-discovery mode, behind Envoy's ORIGINAL_DST
// cluster with full-duplex streamed bodies, as its standalone Helm chart
// (config/charts/llm-d-router-standalone) wires it, configured as llm-d's
// recommended "optimized-baseline" (bench/RESULTS.md says how). The EPP
// listens on every interface (it has no bind flag); only loopback traffic
// is ever sent to it.

// llmdConfig is the EPP's plugin configuration: optimized-baseline, with
// the peak prefill throughput measured on the run's backends
// (PeakPrefillThroughput) and the endpoints read from a file.
var llmdConfig = template.Must(template.New("epp").Parse(`apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: file-discovery
  name: file-discovery
  parameters:
    path: {{.Endpoints}}
- type: approx-prefix-cache-producer
- type: inflight-load-producer
- type: prefix-cache-affinity-filter
  parameters:
    peakPrefillThroughput: {{.PeakPrefill}}
- type: token-load-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-affinity-filter
  - pluginRef: token-load-scorer
dataLayer:
  discovery:
    pluginRef: file-discovery
`))

// llmdEnvoy is Envoy in front of the EPP, in the shape of the standalone
// chart's values.yaml: its ext_proc filter, route, ORIGINAL_DST cluster and
// ext_proc cluster with its gRPC health check, on loopback ports. One
// deviation: failure_mode_allow is false (the chart's default is true), so
// that an EPP outage shows as errors, as it does for tokenlb's deploy/envoy.yaml.
var llmdEnvoy = template.Must(template.New("envoy").Parse(`admin:
  address: {socket_address: {address: 127.0.0.1, port_value: {{.AdminPort}}}}
static_resources:
  listeners:
  - name: vllm
    address: {socket_address: {address: 127.0.0.1, port_value: {{.ListenPort}}}}
    per_connection_buffer_limit_bytes: 32768
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: http
          route_config:
            name: vllm
            virtual_hosts:
            - name: vllm-default
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: original_destination_cluster, timeout: 86400s, idle_timeout: 86400s}
                typed_per_filter_config:
                  envoy.filters.http.ext_proc:
                    "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig
                    config: {}
          http_filters:
          - name: envoy.filters.http.ext_proc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              failure_mode_allow: false
              grpc_service:
                envoy_grpc: {cluster_name: ext_proc, authority: "localhost:{{.EPPPort}}"}
                timeout: 10s
              processing_mode:
                request_header_mode: SEND
                response_header_mode: SEND
                request_body_mode: FULL_DUPLEX_STREAMED
                response_body_mode: FULL_DUPLEX_STREAMED
                request_trailer_mode: SEND
                response_trailer_mode: SEND
              message_timeout: 1000s
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
              suppress_envoy_headers: true
          http2_protocol_options: {max_concurrent_streams: 100, initial_stream_window_size: 65536, initial_connection_window_size: 1048576}
          use_remote_address: true
          normalize_path: true
          merge_slashes: true
  clusters:
  - name: original_destination_cluster
    type: ORIGINAL_DST
    connect_timeout: 1000s
    lb_policy: CLUSTER_PROVIDED
    circuit_breakers: {thresholds: [{max_connections: 40000, max_pending_requests: 40000, max_requests: 40000}]}
    original_dst_lb_config: {use_http_header: true, http_header_name: x-gateway-destination-endpoint}
  - name: ext_proc
    type: STATIC
    connect_timeout: 86400s
    lb_policy: LEAST_REQUEST
    circuit_breakers: {thresholds: [{max_connections: 40000, max_pending_requests: 40000, max_requests: 40000, max_retries: 1024}]}
    health_checks:
    - {timeout: 2s, interval: 10s, unhealthy_threshold: 3, healthy_threshold: 2, reuse_connection: true,
       grpc_health_check: {service_name: "envoy.service.ext_proc.v3.ExternalProcessor"}}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {initial_stream_window_size: 65536, initial_connection_window_size: 1048576}
    load_assignment:
      cluster_name: ext_proc
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: {{.EPPPort}}}}}}]}]
`))

// startLLMD starts llm-d's EPP in front of hosts, then Envoy in front of
// it, and returns the URL of Envoy's chat completions endpoint.
func startLLMD(ctx context.Context, g *proc.Group, o Options, replica int, hosts []string) (string, error) {
	if o.EPP == "" {
		return "", fmt.Errorf("bench: the llm-d arm needs llm-d's endpoint picker: set LLMD_EPP_BIN or --llmd-epp " +
			"(built from github.com/llm-d/llm-d-router, cmd/epp; bench/RESULTS.md names the commit)")
	}
	eppPort, err := startEPP(ctx, g, o, replica, hosts)
	if err != nil {
		return "", err
	}
	var ports struct{ ListenPort, AdminPort, EPPPort int }
	ports.EPPPort = eppPort
	for _, p := range []*int{&ports.ListenPort, &ports.AdminPort} {
		if *p, err = proc.FreePort(); err != nil {
			return "", err
		}
	}
	cfg := filepath.Join(g.Dir, fmt.Sprintf("envoy-llmd-%d.yaml", replica))
	if err := writeTemplate(cfg, llmdEnvoy, ports); err != nil {
		return "", err
	}
	if err := g.Start("envoy", o.Envoy, "-c", cfg, "--disable-hot-restart", "--concurrency", "1", "-l", "error"); err != nil {
		return "", err
	}
	admin := fmt.Sprintf("http://127.0.0.1:%d", ports.AdminPort)
	if err := g.WaitReady(ctx, admin+"/ready"); err != nil {
		return "", err
	}
	// Envoy health-checks the EPP before it sends it a stream.
	healthy := fmt.Sprintf("ext_proc::127.0.0.1:%d::health_flags::healthy", eppPort)
	if err := waitFor(ctx, 30*time.Second, func() bool { return get(admin+"/clusters", healthy) }); err != nil {
		return "", fmt.Errorf("bench: Envoy never found llm-d's EPP healthy: %w", err)
	}
	return fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", ports.ListenPort), nil
}

// startEPP writes the endpoints file and the plugin configuration, starts
// the EPP on free ports and returns its ext_proc port once it listens.
func startEPP(ctx context.Context, g *proc.Group, o Options, replica int, hosts []string) (int, error) {
	var eps strings.Builder
	eps.WriteString("endpoints:\n")
	for i, h := range hosts {
		addr, port, err := net.SplitHostPort(h)
		if err != nil {
			return 0, err
		}
		fmt.Fprintf(&eps, "- name: backend-%d\n  address: %q\n  port: %q\n", i+1, addr, port)
	}
	endpoints := filepath.Join(g.Dir, fmt.Sprintf("llmd-endpoints-%d.yaml", replica))
	if err := os.WriteFile(endpoints, []byte(eps.String()), 0o600); err != nil {
		return 0, err
	}
	cfg := filepath.Join(g.Dir, fmt.Sprintf("llmd-epp-%d.yaml", replica))
	err := writeTemplate(cfg, llmdConfig, struct {
		Endpoints   string
		PeakPrefill float64
	}{endpoints, o.PeakPrefill})
	if err != nil {
		return 0, err
	}
	var ports [3]int // ext_proc, gRPC health, metrics
	for i := range ports {
		if ports[i], err = proc.FreePort(); err != nil {
			return 0, err
		}
	}
	err = g.Start("llm-d", o.EPP, "--pool-name", "bench", "--pool-namespace", "bench", "--config-file", cfg,
		"--grpc-port", fmt.Sprint(ports[0]), "--grpc-health-port", fmt.Sprint(ports[1]), "--metrics-port", fmt.Sprint(ports[2]),
		"--secure-serving=false", "--health-checking=true", "--tracing=false", "--enable-pprof=false", "--v=1")
	if err != nil {
		return 0, err
	}
	listening := func() bool {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", ports[0]), time.Second)
		if err == nil {
			c.Close()
		}
		return err == nil && g.Exited() == nil
	}
	if err := waitFor(ctx, 30*time.Second, listening); err != nil {
		if exited := g.Exited(); exited != nil {
			return 0, exited
		}
		return 0, fmt.Errorf("bench: llm-d's EPP not listening: %w", err)
	}
	return ports[0], nil
}

func writeTemplate(path string, t *template.Template, data any) error {
	var b bytes.Buffer
	if err := t.Execute(&b, data); err != nil {
		return err
	}
	return os.WriteFile(path, b.Bytes(), 0o600)
}

// waitFor polls cond every 50 ms until it holds, ctx ends or limit passes.
func waitFor(ctx context.Context, limit time.Duration, cond func() bool) error {
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("not within %s", limit)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil
}

// get reports whether url answers 200, within a second, with a body that
// contains want.
func get(url, want string) bool {
	resp, err := (&http.Client{Timeout: time.Second}).Get(url)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	return resp.StatusCode == 200 && strings.Contains(b.String(), want)
}
