// Package envoycfg turns one of the deploy/ Envoy configurations into one
// that runs on given loopback ports, changing nothing else, so that tests
// and the demo exercise the configuration users deploy.
package envoycfg

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Options say what to rewrite.
type Options struct {
	ListenPort, AdminPort int
	TokenlbPort           int
	// MoreTokenlbPorts are further tokenlb replicas listed in the tokenlb
	// cluster after TokenlbPort.
	MoreTokenlbPorts []int
	// Backends replace the llm_backends cluster's endpoints, where it lists
	// any (the override-host variant).
	Backends []string
	// Duplex switches the request body to FULL_DUPLEX_STREAMED (with request
	// trailers SEND, which Envoy requires for it).
	Duplex bool
	// Response, when set, changes how tokenlb sees responses: "streamed"
	// drops the observer filter and shows the routing filter the response
	// body (STREAMED); "estimate" drops the observer and shows the routing
	// filter no body, only the end of the stream (response trailers SEND
	// keep the stream open until then); "headers" drops the observer and
	// shows only the response headers.
	Response string
	// WithoutEnd drops tokenlb's end filter, as configurations from before
	// it had none: the observer then follows every response to its end.
	WithoutEnd bool
	// Unsanitised drops the filter that strips a client's destination
	// header, leaving tokenlb's overwrite as the only defence.
	Unsanitised bool
	// TLS, when set, turns on the tokenlb cluster's mutual TLS block that
	// the configuration carries commented out, with these files.
	TLS *TLS
	// SubsetHint, when set, plays a gateway that restricts every request
	// to these endpoints (the Endpoint Picker Protocol's subset hint): a
	// set_metadata filter before tokenlb's writes the list into
	// envoy.lb.subset_hint, which the routing filter forwards.
	SubsetHint []string
	// ReportServed plays a data plane that reports, on the response path,
	// the endpoint that served the request (the Endpoint Picker Protocol's
	// envoy.lb x-gateway-destination-endpoint-served): two filters just
	// before the router, so that on the way back they run before tokenlb's,
	// copy the upstream host Envoy used (%UPSTREAM_HOST%, the last attempt's)
	// into a response header (header_mutation) and that header into the
	// envoy.lb metadata (header_to_metadata, which removes it); tokenlb's
	// ext_proc filters (routing and observer) forward envoy.lb. With the
	// override-host variant, a retry on a fallback host is then reported
	// as served there.
	ReportServed bool
	// Timeout, when set, replaces the timeouts that cut stalled clients
	// and backends (request_headers_timeout, request_timeout and the
	// route's idle_timeout), so that a test can watch them fire.
	Timeout time.Duration
	// Policy, when set (ROUND_ROBIN, LEAST_REQUEST), turns the
	// configuration into an Envoy-only baseline: no tokenlb (its filter and
	// cluster removed) and llm_backends balanced by that lb_policy. Use it on
	// envoy-override-host.yaml, whose cluster lists the backends.
	Policy string
}

// TLS is what Envoy presents to tokenlb and trusts of it.
type TLS struct {
	ClientCert, ClientKey string // Envoy's certificate and key
	CA                    string // the CA that signed tokenlb's certificate
	ServerName            string // tokenlb's certificate's DNS name
}

// Render reads the configuration at path and applies o: every listener and
// the admin bind to 127.0.0.1.
func Render(path string, o Options) (out []byte, err error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if o.TLS != nil {
		if raw, err = uncommentTLS(raw); err != nil {
			return nil, fmt.Errorf("envoycfg: %s: %w", path, err)
		}
	}
	cfg, err := parse(path, raw)
	if err != nil {
		return nil, err
	}
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("envoycfg: %s has an unexpected shape: %v", path, r)
		}
	}()
	setAddr(get(cfg, "admin", "address"), o.AdminPort)
	listener := get(cfg, "static_resources", "listeners", 0)
	setAddr(get(listener, "address"), o.ListenPort)
	if err := renderClusters(get(cfg, "static_resources").(map[string]any), o); err != nil {
		return nil, err
	}
	hcm := get(listener, "filter_chains", 0, "filters", 0, "typed_config").(map[string]any)
	if err := renderFilters(hcm, o); err != nil {
		return nil, err
	}
	if o.Timeout > 0 {
		d := fmt.Sprintf("%gs", o.Timeout.Seconds()) // protobuf JSON: seconds
		hcm["request_headers_timeout"], hcm["request_timeout"] = d, d
		get(hcm, "route_config", "virtual_hosts", 0, "routes", 0, "route").(map[string]any)["idle_timeout"] = d
	}
	return yaml.Marshal(cfg)
}

// renderClusters applies o to the clusters of resources (the
// static_resources), dropping those renderCluster drops.
func renderClusters(resources map[string]any, o Options) error {
	var clusters []any
	for _, c := range resources["clusters"].([]any) {
		c := c.(map[string]any)
		keep, err := renderCluster(c, o)
		if err != nil {
			return err
		}
		if keep {
			clusters = append(clusters, c)
		}
	}
	resources["clusters"] = clusters
	return nil
}

// renderCluster applies o to cluster c: the tokenlb cluster points at
// o.TokenlbPort (and o.MoreTokenlbPorts), and llm_backends lists o.Backends if it lists endpoints.
// With o.Policy, llm_backends is balanced by that lb_policy and the tokenlb
// cluster is dropped: keep is false.
func renderCluster(c map[string]any, o Options) (keep bool, err error) {
	if o.Policy != "" {
		if c["name"] == "tokenlb" {
			return false, nil
		}
		if c["name"] == "llm_backends" {
			delete(c, "load_balancing_policy")
			c["lb_policy"] = o.Policy
		}
	}
	switch c["name"] {
	case "tokenlb":
		setAddr(get(c, "load_assignment", "endpoints", 0, "lb_endpoints", 0, "endpoint", "address"), o.TokenlbPort)
		if o.TLS != nil {
			setTLS(c, *o.TLS)
		}
		if len(o.MoreTokenlbPorts) > 0 {
			var replicas []string
			for _, p := range append([]int{o.TokenlbPort}, o.MoreTokenlbPorts...) {
				replicas = append(replicas, net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
			}
			eps, err := endpoints(replicas)
			if err != nil {
				return false, err
			}
			get(c, "load_assignment", "endpoints", 0).(map[string]any)["lb_endpoints"] = eps
		}
	case "llm_backends":
		if la, ok := c["load_assignment"].(map[string]any); ok {
			eps, err := endpoints(o.Backends)
			if err != nil {
				return false, err
			}
			la["endpoints"] = []any{map[string]any{"lb_endpoints": eps}}
		}
	}
	return true, nil
}

// endpoints returns the lb_endpoints of a cluster that lists the backends,
// given as host:port.
func endpoints(backends []string) ([]any, error) {
	var eps []any
	for _, b := range backends {
		host, port, err := net.SplitHostPort(b)
		if err != nil {
			return nil, fmt.Errorf("envoycfg: backend %q: %w", b, err)
		}
		p, _ := strconv.Atoi(port)
		eps = append(eps, map[string]any{"endpoint": map[string]any{"address": map[string]any{
			"socket_address": map[string]any{"address": host, "port_value": p}}}})
	}
	return eps, nil
}

// renderFilters applies o to the HTTP filters of hcm (the
// HttpConnectionManager), dropping those renderFilter drops.
func renderFilters(hcm map[string]any, o Options) error {
	var filters []any
	for _, f := range hcm["http_filters"].([]any) {
		f := f.(map[string]any)
		keep, err := renderFilter(f, o)
		if err != nil {
			return err
		}
		if o.SubsetHint != nil && f["name"] == "envoy.filters.http.ext_proc" {
			filters = append(filters, subsetHintFilter(o.SubsetHint))
			forward(f, "envoy.lb.subset_hint")
		}
		if o.ReportServed {
			if isExtProc(f) {
				forward(f, "envoy.lb")
			}
			if f["name"] == "envoy.filters.http.router" {
				filters = append(filters, servedFilters()...)
			}
		}
		if keep {
			filters = append(filters, f)
		}
	}
	hcm["http_filters"] = filters
	return nil
}

// renderFilter applies o to HTTP filter f. It drops (keep false) tokenlb's
// ext_proc filters for an Envoy-only baseline (o.Policy), the observer and
// end filters for another o.Response, the end filter for o.WithoutEnd, and
// the header sanitiser when o.Unsanitised; it sets
// the routing filter's processing mode.
func renderFilter(f map[string]any, o Options) (keep bool, err error) {
	name := f["name"]
	if isExtProc(f) {
		name = "envoy.filters.http.ext_proc" // the observer has a name of its own
	}
	switch name {
	case "envoy.filters.http.ext_proc":
		if o.Policy != "" {
			return false, nil
		}
		tc := get(f, "typed_config").(map[string]any)
		if tc["observability_mode"] == true {
			return o.Response == "" && !(o.WithoutEnd && f["name"] == "tokenlb.end"), nil
		}
		pm := get(f, "typed_config", "processing_mode").(map[string]any)
		return true, setProcessingMode(pm, o)
	case "envoy.filters.http.header_mutation":
		return !o.Unsanitised, nil
	}
	return true, nil
}

// setProcessingMode sets the routing filter's processing mode pm for
// o.Response and o.Duplex.
func setProcessingMode(pm map[string]any, o Options) error {
	switch o.Response {
	case "":
	case "streamed":
		pm["response_body_mode"] = "STREAMED"
	case "estimate":
		pm["response_body_mode"], pm["response_trailer_mode"] = "NONE", "SEND"
	case "headers":
		pm["response_body_mode"], pm["response_trailer_mode"] = "NONE", "SKIP"
	default:
		return fmt.Errorf("envoycfg: unknown response mode %q", o.Response)
	}
	if o.Duplex {
		pm["request_body_mode"] = "FULL_DUPLEX_STREAMED"
		pm["request_trailer_mode"] = "SEND"
	}
	return nil
}

// get walks a decoded YAML document by map keys and list indexes.
func get(v any, path ...any) any {
	for _, p := range path {
		switch k := p.(type) {
		case string:
			v = v.(map[string]any)[k]
		case int:
			v = v.([]any)[k]
		}
	}
	return v
}

func setAddr(addr any, port int) {
	sa := addr.(map[string]any)["socket_address"].(map[string]any)
	sa["address"], sa["port_value"] = "127.0.0.1", port
}

// Ports returns the port of the configuration's first listener and the port
// at which it expects tokenlb.
func Ports(path string) (listen, tokenlb int, err error) {
	cfg, err := load(path)
	if err != nil {
		return 0, 0, err
	}
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("envoycfg: %s has an unexpected shape: %v", path, r)
		}
	}()
	port := func(addr any) int { return get(addr, "socket_address", "port_value").(int) }
	listen = port(get(cfg, "static_resources", "listeners", 0, "address"))
	for _, c := range get(cfg, "static_resources", "clusters").([]any) {
		if get(c, "name") == "tokenlb" {
			tokenlb = port(get(c, "load_assignment", "endpoints", 0, "lb_endpoints", 0, "endpoint", "address"))
		}
	}
	if tokenlb == 0 {
		return 0, 0, fmt.Errorf("envoycfg: %s has no tokenlb cluster", path)
	}
	return listen, tokenlb, nil
}

// load reads a configuration as a generic YAML document.
func load(path string) (map[string]any, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return parse(path, raw)
}

func parse(path string, raw []byte) (map[string]any, error) {
	var cfg map[string]any
	if err := yaml.Unmarshal(raw, &cfg); err != nil {
		return nil, fmt.Errorf("envoycfg: %s: %w", path, err)
	}
	return cfg, nil
}

// uncommentTLS turns the commented "# transport_socket:" block of the
// configuration on: that line and the comment lines indented deeper under it.
func uncommentTLS(raw []byte) ([]byte, error) {
	lines := strings.Split(string(raw), "\n")
	start := -1
	for i, l := range lines {
		if strings.TrimSpace(l) == "# transport_socket:" {
			start = i
			break
		}
	}
	if start < 0 {
		return nil, fmt.Errorf("no commented transport_socket block")
	}
	indent := strings.Index(lines[start], "#")
	lines[start] = lines[start][:indent] + "transport_socket:"
	for i := start + 1; i < len(lines); i++ {
		l := lines[i]
		if len(l) < indent+4 || l[:indent] != strings.Repeat(" ", indent) || l[indent:indent+4] != "#   " {
			break
		}
		lines[i] = l[:indent] + l[indent+2:]
	}
	return []byte(strings.Join(lines, "\n")), nil
}

// setTLS points the tokenlb cluster c's transport socket at t's files.
func setTLS(c map[string]any, t TLS) {
	tc := get(c, "transport_socket", "typed_config").(map[string]any)
	tc["sni"] = t.ServerName
	common := get(tc, "common_tls_context").(map[string]any)
	cert := get(common, "tls_certificates", 0).(map[string]any)
	cert["certificate_chain"] = map[string]any{"filename": t.ClientCert}
	cert["private_key"] = map[string]any{"filename": t.ClientKey}
	vc := get(common, "validation_context").(map[string]any)
	vc["trusted_ca"] = map[string]any{"filename": t.CA}
	get(vc, "match_typed_subject_alt_names", 0, "matcher").(map[string]any)["exact"] = t.ServerName
}

// subsetHintFilter is a set_metadata filter that writes hint as the
// Endpoint Picker Protocol's subset hint.
func subsetHintFilter(hint []string) map[string]any {
	list := make([]any, len(hint))
	for i, h := range hint {
		list[i] = h
	}
	return map[string]any{"name": "envoy.filters.http.set_metadata", "typed_config": map[string]any{
		"@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
		"metadata": []any{map[string]any{"metadata_namespace": "envoy.lb.subset_hint",
			"value": map[string]any{"x-gateway-destination-endpoint-subset": list}}}}}
}

// isExtProc says whether HTTP filter f is an ext_proc filter, whatever its
// name (tokenlb's observer has its own).
func isExtProc(f map[string]any) bool {
	tc, _ := f["typed_config"].(map[string]any)
	return tc["@type"] == "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
}

// forward makes ext_proc filter f send the dynamic metadata namespace ns to
// tokenlb with every message (metadata_options.forwarding_namespaces).
func forward(f map[string]any, ns string) {
	tc := get(f, "typed_config").(map[string]any)
	mo, _ := tc["metadata_options"].(map[string]any)
	if mo == nil {
		mo = map[string]any{}
		tc["metadata_options"] = mo
	}
	fwd, _ := mo["forwarding_namespaces"].(map[string]any)
	if fwd == nil {
		fwd = map[string]any{}
		mo["forwarding_namespaces"] = fwd
	}
	untyped, _ := fwd["untyped"].([]any)
	fwd["untyped"] = append(untyped, ns)
}

// servedHeader carries the served endpoint from the header_mutation filter
// to the header_to_metadata one, which removes it before the response leaves
// Envoy. The header_mutation overwrites it: a backend cannot set it.
const servedHeader = "x-tokenlb-e2e-served"

// servedFilters are the ReportServed filters, in filter chain order: on the
// response path the second (header_mutation) runs first.
func servedFilters() []any {
	return []any{
		map[string]any{"name": "tokenlb.e2e.served_metadata", "typed_config": map[string]any{
			"@type": "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config",
			"response_rules": []any{map[string]any{"header": servedHeader, "remove": true,
				"on_header_present": map[string]any{"metadata_namespace": "envoy.lb",
					"key": "x-gateway-destination-endpoint-served", "type": "STRING"}}}}},
		map[string]any{"name": "tokenlb.e2e.served_header", "typed_config": map[string]any{
			"@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
			"mutations": map[string]any{"response_mutations": []any{map[string]any{"append": map[string]any{
				"header":        map[string]any{"key": servedHeader, "value": "%UPSTREAM_HOST%"},
				"append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}}}}},
	}
}
