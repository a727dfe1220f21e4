// Package envoycfg turns one of the deploy/ Envoy configurations into one
// that runs on given loopback ports, changing nothing else, so that tests
// and the demo exercise the configuration users deploy.
package envoycfg

import (
	"fmt"
	"net"
	"os"
	"strconv"

	"go.yaml.in/yaml/v3"
)

// Options say what to rewrite.
type Options struct {
	ListenPort, AdminPort int
	TokenlbPort           int
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
	// Unsanitised drops the filter that strips a client's destination
	// header, leaving tokenlb's overwrite as the only defence.
	Unsanitised bool
	// Policy, when set (ROUND_ROBIN, LEAST_REQUEST), turns the
	// configuration into an Envoy-only baseline: no tokenlb (its filter and
	// cluster removed) and llm_backends balanced by that lb_policy. Use it on
	// envoy-override-host.yaml, whose cluster lists the backends.
	Policy string
}

// Render reads the configuration at path and applies o: every listener and
// the admin bind to 127.0.0.1.
func Render(path string, o Options) (out []byte, err error) {
	cfg, err := load(path)
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
// o.TokenlbPort, and llm_backends lists o.Backends if it lists endpoints.
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
		if keep {
			filters = append(filters, f)
		}
	}
	hcm["http_filters"] = filters
	return nil
}

// renderFilter applies o to HTTP filter f. It drops (keep false) tokenlb's
// ext_proc filters for an Envoy-only baseline (o.Policy), the observer for
// another o.Response, and the header sanitiser when o.Unsanitised; it sets
// the routing filter's processing mode.
func renderFilter(f map[string]any, o Options) (keep bool, err error) {
	switch f["name"] {
	case "envoy.filters.http.ext_proc":
		if o.Policy != "" {
			return false, nil
		}
		tc := get(f, "typed_config").(map[string]any)
		if tc["observability_mode"] == true {
			return o.Response == "", nil
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
	var cfg map[string]any
	if err := yaml.Unmarshal(raw, &cfg); err != nil {
		return nil, fmt.Errorf("envoycfg: %s: %w", path, err)
	}
	return cfg, nil
}
