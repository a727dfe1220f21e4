// Package deploy holds tokenlb's deployment files; these tests check that
// they decode strictly and agree with each other.
package deploy

import (
	"bytes"
	"context"
	"flag"
	"net"
	"os"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/compose-spec/compose-go/v2/loader"
	"github.com/compose-spec/compose-go/v2/types"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/header_mutation/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	k8syaml "sigs.k8s.io/yaml"

	"github.com/tokenlb/tokenlb/config"
	"github.com/tokenlb/tokenlb/internal/envoycfg"
)

// envoyYAML decodes deploy/envoy.yaml generically.
func envoyYAML(t *testing.T) map[string]any {
	t.Helper()
	var v map[string]any
	b, err := os.ReadFile("envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	return v
}

// envoyPorts returns deploy/envoy.yaml's listener port and tokenlb's port.
func envoyPorts(t *testing.T) (listener, tokenlb int) {
	t.Helper()
	listener, tokenlb, err := envoycfg.Ports("envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return listener, tokenlb
}

func tokenlbConfig(t *testing.T, b []byte) config.Config {
	t.Helper()
	c, err := config.Parse(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	return c
}

func port(t *testing.T, addr string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	n, _ := strconv.Atoi(p)
	return n
}

func TestDockerCompose(t *testing.T) {
	p, err := loader.LoadWithContext(context.Background(), types.ConfigDetails{
		WorkingDir:  ".",
		ConfigFiles: []types.ConfigFile{{Filename: "docker-compose.yaml"}},
	}, func(o *loader.Options) { o.SetProjectName("tokenlb", true) })
	if err != nil {
		t.Fatal(err)
	}
	services := map[string]types.ServiceConfig{}
	for name, s := range p.AllServices() {
		services[name] = s
	}
	for _, name := range []string{"envoy", "tokenlb", "llmsim-1", "llmsim-2", "llmsim-3", "prometheus"} {
		if _, ok := services[name]; !ok {
			t.Fatalf("service %s missing", name)
		}
	}
	envoy := services["envoy"]
	if !strings.HasSuffix(envoy.Image, ":v1.40.0") {
		t.Errorf("envoy image %q is not pinned to 1.40", envoy.Image)
	}
	// The mounted Envoy config is deploy/envoy.yaml, at the path envoy is told to load.
	mounted := ""
	for _, v := range envoy.Volumes {
		if strings.HasSuffix(v.Source, "/deploy/envoy.yaml") || v.Source == "envoy.yaml" {
			mounted = v.Target
		}
	}
	if mounted == "" || !strings.Contains(strings.Join(envoy.Command, " "), "-c "+mounted) {
		t.Fatalf("envoy does not load the mounted deploy/envoy.yaml (volumes %v, command %v)", envoy.Volumes, envoy.Command)
	}
	listenerPort, tokenlbPort := envoyPorts(t)
	published := map[int]bool{}
	for _, pc := range envoy.Ports {
		published[int(pc.Target)] = true
	}
	if !published[listenerPort] {
		t.Errorf("envoy.yaml listens on %d, which compose does not publish", listenerPort)
	}
	tl := services["tokenlb"]
	if tl.NetworkMode != "service:envoy" {
		t.Errorf("tokenlb network_mode %q: it must share Envoy's namespace for envoy.yaml's loopback address", tl.NetworkMode)
	}
	if tl.Build == nil || !strings.HasSuffix(tl.Build.Dockerfile, "Dockerfile") {
		t.Errorf("tokenlb is not built from the repository's Dockerfile: %+v", tl.Build)
	}
	b, err := os.ReadFile("tokenlb-compose.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cfg := tokenlbConfig(t, b)
	if port(t, cfg.Listen) != tokenlbPort {
		t.Errorf("tokenlb listens on %s, envoy.yaml expects port %d", cfg.Listen, tokenlbPort)
	}
	if !published[port(t, cfg.Admin)] {
		t.Errorf("tokenlb admin %s is not published", cfg.Admin)
	}
	var sims []string
	for _, name := range []string{"llmsim-1", "llmsim-2", "llmsim-3"} {
		s := services[name]
		listen := s.Entrypoint[len(s.Entrypoint)-1]
		ip := s.Networks["llm"].Ipv4Address
		sims = append(sims, net.JoinHostPort(ip, strconv.Itoa(port(t, listen))))
	}
	if got := cfg.HostAddresses(); !reflect.DeepEqual(got, sims) {
		t.Errorf("tokenlb hosts %v, llmsim containers at %v", got, sims)
	}
	for _, f := range []string{"../Dockerfile", "prometheus.yaml"} {
		if _, err := os.Stat(f); err != nil {
			t.Error(err)
		}
	}
}

// decodeStrict decodes YAML into v, refusing unknown fields.
func decodeStrict(t *testing.T, doc []byte, v any) {
	t.Helper()
	if err := k8syaml.UnmarshalStrict(doc, v); err != nil {
		t.Fatalf("%T: %v", v, err)
	}
}

var update = flag.Bool("update", false, "copy deploy/envoy.yaml into kubernetes.yaml's ConfigMap")

// syncKubernetes replaces the ConfigMap's envoy.yaml block (the lines after
// "  envoy.yaml: |" up to the next document) with deploy/envoy.yaml.
func syncKubernetes(t *testing.T, b []byte) []byte {
	t.Helper()
	envoy, err := os.ReadFile("envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	start := bytes.Index(b, []byte("  envoy.yaml: |\n"))
	end := bytes.Index(b[start:], []byte("\n---\n"))
	if start < 0 || end < 0 {
		t.Fatal("kubernetes.yaml has no envoy.yaml block")
	}
	var block bytes.Buffer
	block.WriteString("  envoy.yaml: |\n")
	for _, line := range strings.SplitAfter(strings.TrimRight(string(envoy), "\n"), "\n") {
		if strings.TrimSpace(line) != "" {
			block.WriteString("    ")
		}
		block.WriteString(line)
	}
	out := append(append(append([]byte{}, b[:start]...), block.Bytes()...), b[start+end:]...)
	if err := os.WriteFile("kubernetes.yaml", out, 0o644); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestKubernetes(t *testing.T) {
	b, err := os.ReadFile("kubernetes.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if *update {
		b = syncKubernetes(t, b)
	}
	var cm corev1.ConfigMap
	var deploy appsv1.Deployment
	var sts appsv1.StatefulSet
	services := map[string]corev1.Service{}
	kinds := map[string]int{}
	for _, doc := range bytes.Split(b, []byte("\n---\n")) {
		var meta struct{ Kind string }
		k8syaml.Unmarshal(doc, &meta)
		kinds[meta.Kind]++
		switch meta.Kind {
		case "ConfigMap":
			decodeStrict(t, doc, &cm)
		case "Deployment":
			decodeStrict(t, doc, &deploy)
		case "StatefulSet":
			decodeStrict(t, doc, &sts)
		case "Service":
			var s corev1.Service
			decodeStrict(t, doc, &s)
			services[s.Name] = s
		default:
			t.Fatalf("unexpected kind %q", meta.Kind)
		}
	}
	if kinds["Deployment"] != 1 || kinds["ConfigMap"] != 1 || kinds["StatefulSet"] != 1 || kinds["Service"] != 2 {
		t.Fatalf("kinds: %v", kinds)
	}
	var names []string
	for _, c := range deploy.Spec.Template.Spec.Containers {
		names = append(names, c.Name)
	}
	if !reflect.DeepEqual(names, []string{"envoy", "tokenlb"}) {
		t.Fatalf("gateway containers %v, want envoy with a tokenlb sidecar", names)
	}
	// The ConfigMap's envoy.yaml is deploy/envoy.yaml.
	var inMap, inFile map[string]any
	yaml.Unmarshal([]byte(cm.Data["envoy.yaml"]), &inMap)
	inFile = envoyYAML(t)
	if !reflect.DeepEqual(inMap, inFile) {
		t.Fatal("kubernetes.yaml's envoy.yaml differs from deploy/envoy.yaml: run go test ./deploy -run Kubernetes -update")
	}
	cfg := tokenlbConfig(t, []byte(cm.Data["tokenlb.yaml"]))
	_, tokenlbPort := envoyPorts(t)
	if port(t, cfg.Listen) != tokenlbPort {
		t.Errorf("tokenlb listens on %s, envoy.yaml expects port %d", cfg.Listen, tokenlbPort)
	}
	// The hosts are the DNS answers for the StatefulSet's headless
	// Service: the pods' own IPs, on the port the Service names.
	name, dnsPort, err := net.SplitHostPort(cfg.Discovery.DNS.Name)
	if cfg.Discovery.Source != "dns" || err != nil {
		t.Fatalf("tokenlb's hosts do not come from the DNS: %+v", cfg.Discovery)
	}
	svc, ok := services[name]
	switch {
	case !ok:
		t.Fatalf("no Service %q for discovery.dns.name %s", name, cfg.Discovery.DNS.Name)
	case svc.Spec.ClusterIP != "None":
		t.Errorf("Service %s is not headless: its name would resolve to one virtual IP", name)
	case strconv.Itoa(int(svc.Spec.Ports[0].Port)) != dnsPort:
		t.Errorf("discovery.dns.name port %s, Service %s port %d", dnsPort, name, svc.Spec.Ports[0].Port)
	case sts.Spec.ServiceName != name || svc.Spec.Selector["app.kubernetes.io/name"] != sts.Spec.Template.Labels["app.kubernetes.io/name"]:
		t.Errorf("Service %s does not select the StatefulSet's pods", name)
	}
}

func TestIstioEnvoyFilter(t *testing.T) {
	b, err := os.ReadFile("istio-envoyfilter.yaml")
	if err != nil {
		t.Fatal(err)
	}
	// networking.istio.io/v1alpha3 EnvoyFilter, the fields this file uses.
	var ef struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Metadata   struct {
			Name      string `json:"name"`
			Namespace string `json:"namespace"`
		} `json:"metadata"`
		Spec struct {
			WorkloadSelector struct {
				Labels map[string]string `json:"labels"`
			} `json:"workloadSelector"`
			ConfigPatches []struct {
				ApplyTo string `json:"applyTo"`
				Match   struct {
					Context  string `json:"context"`
					Listener *struct {
						FilterChain struct {
							Filter struct {
								Name      string `json:"name"`
								SubFilter struct {
									Name string `json:"name"`
								} `json:"subFilter"`
							} `json:"filter"`
						} `json:"filterChain"`
					} `json:"listener"`
					RouteConfiguration *struct {
						Vhost struct {
							Route struct {
								Name string `json:"name"`
							} `json:"route"`
						} `json:"vhost"`
					} `json:"routeConfiguration"`
				} `json:"match"`
				Patch struct {
					Operation string         `json:"operation"`
					Value     map[string]any `json:"value"`
				} `json:"patch"`
			} `json:"configPatches"`
		} `json:"spec"`
	}
	decodeStrict(t, b, &ef)
	if ef.APIVersion != "networking.istio.io/v1alpha3" || ef.Kind != "EnvoyFilter" || len(ef.Spec.ConfigPatches) != 6 {
		t.Fatalf("EnvoyFilter header or patch count wrong: %s %s %d", ef.APIVersion, ef.Kind, len(ef.Spec.ConfigPatches))
	}
	// Each patch value must be a valid Envoy message of its kind: protojson
	// refuses unknown fields and unknown Any types.
	for i, cp := range ef.Spec.ConfigPatches {
		var msg proto.Message
		switch cp.ApplyTo {
		case "HTTP_FILTER":
			msg = &hcmv3.HttpFilter{}
		case "CLUSTER":
			msg = &clusterv3.Cluster{}
		case "HTTP_ROUTE":
			msg = &routev3.Route{}
		default:
			t.Fatalf("patch %d: unexpected applyTo %s", i, cp.ApplyTo)
		}
		js, err := k8syaml.Marshal(cp.Patch.Value)
		if err == nil {
			js, err = k8syaml.YAMLToJSON(js)
		}
		if err != nil {
			t.Fatal(err)
		}
		if err := protojson.Unmarshal(js, msg); err != nil {
			t.Errorf("patch %d (%s): %v", i, cp.ApplyTo, err)
		}
	}
}

// TestTimeouts: both Envoy configs bound every wait a client or a backend
// can stall: the request's headers, the whole request, the response and a
// silent backend, and tokenlb's answers on the routing stream.
func TestTimeouts(t *testing.T) {
	for _, file := range []string{"envoy.yaml", "envoy-override-host.yaml"} {
		t.Run(file, func(t *testing.T) {
			b, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			var cfg map[string]any
			if err := yaml.Unmarshal(b, &cfg); err != nil {
				t.Fatal(err)
			}
			at := func(v any, path ...any) any {
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
			hcm := at(cfg, "static_resources", "listeners", 0, "filter_chains", 0, "filters", 0, "typed_config")
			route := at(hcm, "route_config", "virtual_hosts", 0, "routes", 0, "route")
			var extProc any
			for _, f := range at(hcm, "http_filters").([]any) {
				if at(f, "name") == "envoy.filters.http.ext_proc" {
					extProc = at(f, "typed_config")
				}
			}
			for _, c := range []struct {
				what string
				v    any
			}{
				{"request_headers_timeout", at(hcm, "request_headers_timeout")},
				{"request_timeout", at(hcm, "request_timeout")},
				{"route timeout", at(route, "timeout")},
				{"route idle_timeout", at(route, "idle_timeout")},
				{"ext_proc message_timeout", at(extProc, "message_timeout")},
			} {
				s, _ := c.v.(string)
				d, err := time.ParseDuration(s)
				if err != nil || d <= 0 {
					t.Errorf("%s: %v, want a positive duration", c.what, c.v)
				}
			}
		})
	}
}
