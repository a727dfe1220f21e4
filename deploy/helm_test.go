package deploy

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"maps"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	k8syaml "sigs.k8s.io/yaml"
)

// The chart, relative to this package, and how the tests install it.
const (
	chartDir     = "helm/tokenlb"
	helmRelease  = "llm"
	helmNS       = "inference"
	helmFullname = "llm-tokenlb"
)

// helmBin returns the Helm binary HELM_BIN names (make test sets it from
// scripts/helm.sh). Without it the chart's tests skip, or fail under
// CI=true, as the e2e suite does without Envoy.
func helmBin(t *testing.T) string {
	t.Helper()
	return tool(t, "HELM_BIN", "helm.sh", "the Helm chart")
}

// tool returns the path the environment variable env names (make test sets
// it from scripts/script). Without it the test skips, or fails under
// CI=true, as the e2e suite does without Envoy; what names what it checks.
func tool(t *testing.T, env, script, what string) string {
	t.Helper()
	p := os.Getenv(env)
	if p == "" {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s is not set: CI must check %s (%s=\"$(scripts/%s)\")", env, what, env, script)
		}
		t.Skipf("%s is not set; %s=\"$(scripts/%s)\" go test ./deploy checks %s", env, env, script, what)
	}
	return p
}

// runHelm runs helm with its caches and config in a temporary folder, so
// that nothing of the user's Helm setup (repositories, plugins) counts.
func runHelm(t *testing.T, bin string, args ...string) ([]byte, error) {
	t.Helper()
	home := t.TempDir()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(),
		"HELM_CACHE_HOME="+filepath.Join(home, "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(home, "config"),
		"HELM_DATA_HOME="+filepath.Join(home, "data"))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("helm %s: %v: %s", strings.Join(args, " "), err, stderr.Bytes())
	}
	return out, nil
}

// valuesFile writes a values file for one case.
func valuesFile(t *testing.T, values string) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "values.yaml")
	if err := os.WriteFile(f, []byte(values), 0o644); err != nil {
		t.Fatal(err)
	}
	return f
}

// objectMeta is the part of an object's metadata the chart sets.
type objectMeta struct {
	Name        string            `json:"name"`
	Namespace   string            `json:"namespace,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

type poolPort struct {
	Number int32 `json:"number"`
}

// inferencePool mirrors inference.networking.k8s.io/v1 InferencePool (its
// spec; status is never written by a chart).
type inferencePool struct {
	APIVersion string     `json:"apiVersion"`
	Kind       string     `json:"kind"`
	Metadata   objectMeta `json:"metadata"`
	Spec       struct {
		Selector struct {
			MatchLabels map[string]string `json:"matchLabels"`
		} `json:"selector"`
		TargetPorts       []poolPort `json:"targetPorts"`
		AppProtocol       string     `json:"appProtocol,omitempty"`
		EndpointPickerRef struct {
			Group       *string   `json:"group,omitempty"`
			Kind        string    `json:"kind,omitempty"`
			Name        string    `json:"name"`
			Port        *poolPort `json:"port,omitempty"`
			FailureMode string    `json:"failureMode,omitempty"`
		} `json:"endpointPickerRef"`
	} `json:"spec"`
}

// destinationRule is networking.istio.io/v1 DestinationRule, the fields the
// chart may set.
type destinationRule struct {
	APIVersion string     `json:"apiVersion"`
	Kind       string     `json:"kind"`
	Metadata   objectMeta `json:"metadata"`
	Spec       struct {
		Host          string `json:"host"`
		TrafficPolicy struct {
			PortLevelSettings []struct {
				Port poolPort `json:"port"`
				TLS  struct {
					Mode               string   `json:"mode"`
					CredentialName     string   `json:"credentialName,omitempty"`
					SubjectAltNames    []string `json:"subjectAltNames,omitempty"`
					InsecureSkipVerify *bool    `json:"insecureSkipVerify,omitempty"`
				} `json:"tls"`
			} `json:"portLevelSettings"`
		} `json:"trafficPolicy"`
	} `json:"spec"`
}

// serviceMonitor is monitoring.coreos.com/v1 ServiceMonitor, the fields the
// chart sets.
type serviceMonitor struct {
	APIVersion string     `json:"apiVersion"`
	Kind       string     `json:"kind"`
	Metadata   objectMeta `json:"metadata"`
	Spec       struct {
		Selector struct {
			MatchLabels map[string]string `json:"matchLabels"`
		} `json:"selector"`
		Endpoints []struct {
			Port     string `json:"port"`
			Path     string `json:"path"`
			Interval string `json:"interval"`
		} `json:"endpoints"`
	} `json:"spec"`
}

// gkePolicy is networking.gke.io/v1 HealthCheckPolicy or GCPBackendPolicy,
// the fields the chart sets.
type gkePolicy struct {
	APIVersion string     `json:"apiVersion"`
	Kind       string     `json:"kind"`
	Metadata   objectMeta `json:"metadata"`
	Spec       struct {
		TargetRef struct {
			Group string `json:"group"`
			Kind  string `json:"kind"`
			Name  string `json:"name"`
		} `json:"targetRef"`
		Default struct {
			TimeoutSec int `json:"timeoutSec,omitempty"`
			Config     *struct {
				Type            string `json:"type"`
				HTTPHealthCheck struct {
					RequestPath string `json:"requestPath"`
					Port        int32  `json:"port"`
				} `json:"httpHealthCheck"`
			} `json:"config,omitempty"`
		} `json:"default"`
	} `json:"spec"`
}

// rendered is what helm template produced, each object decoded strictly.
type rendered struct {
	kinds           map[string]int
	labels          map[string]map[string]string // kind/name → labels
	serviceAccounts []corev1.ServiceAccount
	roles           []rbacv1.Role
	roleBindings    []rbacv1.RoleBinding
	configMaps      []corev1.ConfigMap
	deployments     []appsv1.Deployment
	services        map[string]corev1.Service
	pools           []inferencePool
	destRules       []destinationRule
	monitors        []serviceMonitor
	gke             map[string]gkePolicy // by kind
}

// apiVersions is each kind the chart may render, with its API version.
var apiVersions = map[string]string{
	"ServiceAccount":    "v1",
	"ConfigMap":         "v1",
	"Service":           "v1",
	"Role":              "rbac.authorization.k8s.io/v1",
	"RoleBinding":       "rbac.authorization.k8s.io/v1",
	"Deployment":        "apps/v1",
	"InferencePool":     "inference.networking.k8s.io/v1",
	"DestinationRule":   "networking.istio.io/v1",
	"ServiceMonitor":    "monitoring.coreos.com/v1",
	"HealthCheckPolicy": "networking.gke.io/v1",
	"GCPBackendPolicy":  "networking.gke.io/v1",
}

var docSeparator = regexp.MustCompile(`(?m)^---[ \t]*$`)

// decodeRendered splits helm template's output into documents and decodes
// each strictly into its type: an unknown field fails the test.
func decodeRendered(t *testing.T, out []byte) *rendered {
	t.Helper()
	r := &rendered{kinds: map[string]int{}, labels: map[string]map[string]string{},
		services: map[string]corev1.Service{}, gke: map[string]gkePolicy{}}
	for _, doc := range docSeparator.Split(string(out), -1) {
		empty := true
		for _, line := range strings.Split(doc, "\n") {
			if l := strings.TrimSpace(line); l != "" && !strings.HasPrefix(l, "#") {
				empty = false
			}
		}
		if empty {
			continue
		}
		b := []byte(doc)
		var head struct {
			APIVersion string     `json:"apiVersion"`
			Kind       string     `json:"kind"`
			Metadata   objectMeta `json:"metadata"`
		}
		if err := k8syaml.Unmarshal(b, &head); err != nil {
			t.Fatalf("%v in\n%s", err, doc)
		}
		want, ok := apiVersions[head.Kind]
		if !ok {
			t.Fatalf("unexpected kind %q:\n%s", head.Kind, doc)
		}
		if head.APIVersion != want {
			t.Errorf("%s %s: apiVersion %s, want %s", head.Kind, head.Metadata.Name, head.APIVersion, want)
		}
		if head.Metadata.Name == "" {
			t.Errorf("a %s has no name", head.Kind)
		}
		r.kinds[head.Kind]++
		r.labels[head.Kind+"/"+head.Metadata.Name] = head.Metadata.Labels
		switch head.Kind {
		case "ServiceAccount":
			var o corev1.ServiceAccount
			decodeStrict(t, b, &o)
			r.serviceAccounts = append(r.serviceAccounts, o)
		case "Role":
			var o rbacv1.Role
			decodeStrict(t, b, &o)
			r.roles = append(r.roles, o)
		case "RoleBinding":
			var o rbacv1.RoleBinding
			decodeStrict(t, b, &o)
			r.roleBindings = append(r.roleBindings, o)
		case "ConfigMap":
			var o corev1.ConfigMap
			decodeStrict(t, b, &o)
			r.configMaps = append(r.configMaps, o)
		case "Deployment":
			var o appsv1.Deployment
			decodeStrict(t, b, &o)
			r.deployments = append(r.deployments, o)
		case "Service":
			var o corev1.Service
			decodeStrict(t, b, &o)
			r.services[o.Name] = o
		case "InferencePool":
			var o inferencePool
			decodeStrict(t, b, &o)
			r.pools = append(r.pools, o)
		case "DestinationRule":
			var o destinationRule
			decodeStrict(t, b, &o)
			r.destRules = append(r.destRules, o)
		case "ServiceMonitor":
			var o serviceMonitor
			decodeStrict(t, b, &o)
			r.monitors = append(r.monitors, o)
		case "HealthCheckPolicy", "GCPBackendPolicy":
			var o gkePolicy
			decodeStrict(t, b, &o)
			r.gke[head.Kind] = o
		}
	}
	return r
}

// chartValues are the values the checks derive their expectations from:
// values.yaml with the case's values on top.
type chartValues struct {
	Mode     string `json:"mode"`
	Replicas int32  `json:"replicas"`
	Image    struct {
		Repository string `json:"repository"`
		Tag        string `json:"tag"`
	} `json:"image"`
	Backends struct {
		Source  string `json:"source"`
		Service struct {
			Name string `json:"name"`
			Port string `json:"port"`
		} `json:"service"`
	} `json:"backends"`
	InferencePool struct {
		Create       bool   `json:"create"`
		Name         string `json:"name"`
		ModelServers struct {
			MatchLabels map[string]string `json:"matchLabels"`
		} `json:"modelServers"`
		TargetPorts []poolPort `json:"targetPorts"`
		FailureMode string     `json:"failureMode"`
	} `json:"inferencePool"`
	TLS struct {
		Mode   string `json:"mode"`
		Secret struct {
			Name        string `json:"name"`
			CertKey     string `json:"certKey"`
			KeyKey      string `json:"keyKey"`
			ClientCAKey string `json:"clientCAKey"`
		} `json:"secret"`
	} `json:"tls"`
	Provider struct {
		Name  string `json:"name"`
		Istio struct {
			DestinationRule struct {
				CredentialName  string   `json:"credentialName"`
				SubjectAltNames []string `json:"subjectAltNames"`
			} `json:"destinationRule"`
		} `json:"istio"`
		GKE struct {
			HealthCheckPath string `json:"healthCheckPath"`
			TimeoutSec      int    `json:"timeoutSec"`
		} `json:"gke"`
	} `json:"provider"`
	Service struct {
		Type string `json:"type"`
		Port int32  `json:"port"`
	} `json:"service"`
	Config struct {
		Extra map[string]any `json:"extra"`
	} `json:"config"`
	ServiceMonitor struct {
		Enabled  bool              `json:"enabled"`
		Interval string            `json:"interval"`
		Labels   map[string]string `json:"labels"`
	} `json:"serviceMonitor"`
}

// mergeValues lays over on base, maps key by key, as Helm does.
func mergeValues(base, over map[string]any) map[string]any {
	out := maps.Clone(base)
	for k, v := range over {
		if bm, ok := out[k].(map[string]any); ok {
			if om, ok := v.(map[string]any); ok {
				out[k] = mergeValues(bm, om)
				continue
			}
		}
		out[k] = v
	}
	return out
}

func effectiveValues(t *testing.T, caseValues string) chartValues {
	t.Helper()
	var base, over map[string]any
	b, err := os.ReadFile(filepath.Join(chartDir, "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := k8syaml.Unmarshal(b, &base); err != nil {
		t.Fatal(err)
	}
	if err := k8syaml.Unmarshal([]byte(caseValues), &over); err != nil {
		t.Fatal(err)
	}
	js, err := k8syaml.Marshal(mergeValues(base, over))
	if err != nil {
		t.Fatal(err)
	}
	var v chartValues
	if err := k8syaml.Unmarshal(js, &v); err != nil {
		t.Fatal(err)
	}
	return v
}

// helmCases are the chart's modes and variants; each is rendered, linted
// and checked against its values.
var helmCases = []struct{ name, values string }{
	{"gateway", `
inferencePool:
  modelServers: {matchLabels: {app: vllm-llama3-8b}}
`},
	{"gateway-istio", `
replicas: 2
inferencePool:
  modelServers: {matchLabels: {app: vllm-llama3-8b, tier: gpu}}
  targetPorts: [{number: 8000}, {number: 8001}]
  failureMode: FailOpen
provider: {name: istio}
`},
	{"gateway-tls-secret", `
inferencePool:
  name: llama
  modelServers: {matchLabels: {app: vllm-llama3-8b}}
tls:
  mode: secret
  secret: {name: tokenlb-tls, clientCAKey: ca.crt}
provider:
  name: istio
  istio:
    destinationRule: {credentialName: tokenlb-ca, subjectAltNames: [llm-tokenlb.inference.svc]}
`},
	{"gateway-mesh-plaintext", `
inferencePool:
  modelServers: {matchLabels: {app: vllm-llama3-8b}}
tls: {mode: plaintext}
provider: {name: istio}
`},
	{"gateway-gke", `
inferencePool:
  modelServers: {matchLabels: {app: vllm-llama3-8b}}
provider: {name: gke}
`},
	{"standalone-pool", `
mode: standalone
inferencePool:
  modelServers: {matchLabels: {app.kubernetes.io/name: vllm}}
service: {type: LoadBalancer, port: 8080}
config:
  logFormat: text
  extra: {prefix_affinity: {max_extra_load: 1s}, backend_metrics: {interval: 1s}}
`},
	{"standalone-existing-pool", `
mode: standalone
inferencePool: {create: false, name: shared-pool}
`},
	{"standalone-service", `
mode: standalone
backends:
  source: service
  service: {name: vllm, port: http}
`},
	{"gateway-servicemonitor", `
inferencePool:
  modelServers: {matchLabels: {app: vllm-llama3-8b}}
serviceMonitor: {enabled: true, labels: {release: prometheus}}
`},
	{"standalone-servicemonitor", `
mode: standalone
backends:
  source: service
  service: {name: vllm}
serviceMonitor: {enabled: true, interval: 15s}
`},
}

// TestHelmEnvoyCopy: the chart cannot read files outside its folder, so
// standalone mode's Envoy config is a copy of deploy/envoy.yaml, which must
// stay byte-identical (-update copies it).
func TestHelmEnvoyCopy(t *testing.T) {
	want, err := os.ReadFile("envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	copyPath := filepath.Join(chartDir, "files", "envoy.yaml")
	if *update {
		if err := os.WriteFile(copyPath, want, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(copyPath)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s differs from deploy/envoy.yaml: run go test ./deploy -run HelmEnvoyCopy -update", copyPath)
	}
}

func TestHelmChart(t *testing.T) {
	bin := helmBin(t)
	for _, tc := range helmCases {
		t.Run(tc.name, func(t *testing.T) {
			vf := valuesFile(t, tc.values)
			if out, err := runHelm(t, bin, "lint", "--strict", chartDir, "--namespace", helmNS, "-f", vf); err != nil {
				t.Errorf("helm lint --strict: %v\n%s", err, out)
			}
			out, err := runHelm(t, bin, "template", helmRelease, chartDir, "--namespace", helmNS, "-f", vf)
			if err != nil {
				t.Fatal(err)
			}
			checkChart(t, effectiveValues(t, tc.values), decodeRendered(t, out))
		})
	}
}

// TestHelmRefuses: values that cannot work fail the render, naming the value.
func TestHelmRefuses(t *testing.T) {
	bin := helmBin(t)
	for _, tc := range []struct{ values, want string }{
		{``, "inferencePool.modelServers.matchLabels"},
		{`{mode: sidecar}`, "mode:"},
		{`{backends: {source: service, service: {name: vllm}}}`, "backends.source: gateway mode needs inferencePool"},
		{`{mode: standalone, backends: {source: service}}`, "backends.service.name"},
		{`{mode: standalone, inferencePool: {create: false}}`, "inferencePool.name"},
		{`{inferencePool: {modelServers: {matchLabels: {app: x}}, targetPorts: []}}`, "inferencePool.targetPorts"},
		{`{inferencePool: {modelServers: {matchLabels: {app: x}}, failureMode: Open}}`, "inferencePool.failureMode"},
		{`{inferencePool: {modelServers: {matchLabels: {app: x}}}, tls: {mode: secret}}`, "tls.secret.name"},
		{`{inferencePool: {modelServers: {matchLabels: {app: x}}}, provider: {name: nginx}}`, "provider.name"},
		{`{mode: standalone, inferencePool: {modelServers: {matchLabels: {app: x}}}, provider: {name: istio}}`, "provider.name"},
		{`{inferencePool: {modelServers: {matchLabels: {app: x}}}, provider: {name: istio, istio: {destinationRule: {credentialName: ca}}}}`,
			"provider.istio.destinationRule.credentialName"},
		{`{inferencePool: {modelServers: {matchLabels: {app: x}}}, tls: {mode: secret, secret: {name: s, clientCAKey: ca.crt}}, provider: {name: istio}}`,
			"provider.istio.destinationRule.credentialName"},
	} {
		_, err := runHelm(t, bin, "template", helmRelease, chartDir, "--namespace", helmNS, "-f", valuesFile(t, tc.values))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("values %s: error %v, want one naming %q", tc.values, err, tc.want)
		}
	}
}

// TestHelmValuesCommented: every value in values.yaml has a comment (above
// it or on its line), as the chart's users read nothing else.
func TestHelmValuesCommented(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(chartDir, "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	var walk func(n *yaml.Node, at string)
	walk = func(n *yaml.Node, at string) {
		if n.Kind != yaml.MappingNode {
			return
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			key := strings.TrimPrefix(at+"."+k.Value, ".")
			if k.HeadComment == "" && k.LineComment == "" && v.LineComment == "" {
				t.Errorf("values.yaml: %s has no comment", key)
			}
			walk(v, key)
		}
	}
	walk(doc.Content[0], "")
}

// checkChart checks one rendering against the values it came from.
func checkChart(t *testing.T, v chartValues, r *rendered) {
	gateway := v.Mode == "gateway"
	usePool := v.Backends.Source == "inferencePool"

	// The objects, and nothing else.
	want := map[string]int{"ServiceAccount": 1, "Role": 1, "RoleBinding": 1, "ConfigMap": 1, "Deployment": 1, "Service": 2}
	if gateway {
		want["Service"] = 1
	}
	if usePool && v.InferencePool.Create {
		want["InferencePool"] = 1
	}
	if gateway && v.Provider.Name == "istio" && v.TLS.Mode != "plaintext" {
		want["DestinationRule"] = 1
	}
	if v.Provider.Name == "gke" {
		want["HealthCheckPolicy"], want["GCPBackendPolicy"] = 1, 1
	}
	if v.ServiceMonitor.Enabled {
		want["ServiceMonitor"] = 1
	}
	if !maps.Equal(r.kinds, want) {
		t.Fatalf("kinds %v, want %v", r.kinds, want)
	}
	for obj, labels := range r.labels {
		if labels["app.kubernetes.io/name"] != "tokenlb" || labels["app.kubernetes.io/instance"] != helmRelease {
			t.Errorf("%s: labels %v lack the chart's name and instance", obj, labels)
		}
	}

	// The pod: tokenlb (behind Envoy in standalone mode), its identity and
	// its configuration.
	d := r.deployments[0]
	pod := d.Spec.Template
	if d.Spec.Replicas == nil || *d.Spec.Replicas != v.Replicas {
		t.Errorf("replicas %v, want %d", d.Spec.Replicas, v.Replicas)
	}
	if !subset(d.Spec.Selector.MatchLabels, pod.Labels) || len(d.Spec.Selector.MatchLabels) == 0 {
		t.Errorf("Deployment selector %v does not select its pods %v", d.Spec.Selector.MatchLabels, pod.Labels)
	}
	var names []string
	for _, c := range pod.Spec.Containers {
		names = append(names, c.Name)
	}
	wantNames := []string{"tokenlb"}
	if !gateway {
		wantNames = []string{"envoy", "tokenlb"}
	}
	if !slices.Equal(names, wantNames) {
		t.Fatalf("containers %v, want %v", names, wantNames)
	}
	tl := pod.Spec.Containers[len(pod.Spec.Containers)-1]
	if tl.Image != v.Image.Repository+":"+v.Image.Tag {
		t.Errorf("tokenlb image %s, want %s:%s", tl.Image, v.Image.Repository, v.Image.Tag)
	}
	checkRBAC(t, v, r, pod.Spec.ServiceAccountName)
	cm := r.configMaps[0]
	if len(tl.Args) != 2 || tl.Args[0] != "--config" {
		t.Fatalf("tokenlb args %v, want --config <file>", tl.Args)
	}
	if dir, file := path.Split(tl.Args[1]); mountedConfigMap(t, pod.Spec, tl, strings.TrimSuffix(dir, "/")) != cm.Name || cm.Data[file] == "" {
		t.Fatalf("tokenlb's --config %s is not ConfigMap %s's %s", tl.Args[1], cm.Name, file)
	}
	tc := checkTokenlbConfig(t, v, r, pod.Spec, tl, cm.Data[path.Base(tl.Args[1])])
	checkProbes(t, v, tl)

	// Every Service selects the pods, on ports the pods have.
	for name, s := range r.services {
		if len(s.Spec.Selector) == 0 || !subset(s.Spec.Selector, pod.Labels) {
			t.Errorf("Service %s selector %v does not select the pods %v", name, s.Spec.Selector, pod.Labels)
		}
		for _, p := range s.Spec.Ports {
			if containerPort(pod.Spec, p.TargetPort.String()) == 0 {
				t.Errorf("Service %s port %s: targetPort %s is no container port", name, p.Name, p.TargetPort.String())
			}
		}
	}

	// Where tokenlb listens, and the Services in front.
	adminSvc := helmFullname + "-admin"
	if gateway {
		adminSvc = helmFullname
		svc, ok := r.services[helmFullname]
		grpc := servicePort(svc, "grpc")
		switch {
		case !ok || grpc == nil:
			t.Fatalf("no Service %s with a grpc port: %v", helmFullname, r.services)
		case tc.Listen != "0.0.0.0:9002" || containerPort(pod.Spec, grpc.TargetPort.String()) != int32(port(t, tc.Listen)):
			t.Errorf("tokenlb listens on %s; Service %s's grpc port leads to container port %d", tc.Listen, helmFullname,
				containerPort(pod.Spec, grpc.TargetPort.String()))
		case grpc.AppProtocol == nil || *grpc.AppProtocol != "http2":
			t.Errorf("Service grpc port appProtocol %v, want http2 (gRPC)", grpc.AppProtocol)
		}
		if !tc.DestinationList {
			t.Error("gateway mode: destination_list is not true (gateways read the ordered list from the header)")
		}
	} else {
		_, tokenlbPort := envoyPorts(t)
		host, p, _ := net.SplitHostPort(tc.Listen)
		if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() || p != strconv.Itoa(tokenlbPort) {
			t.Errorf("standalone: tokenlb listens on %s, want loopback port %d (envoy.yaml's tokenlb cluster)", tc.Listen, tokenlbPort)
		}
		if tc.DestinationList {
			t.Error("standalone: destination_list is true, but envoy.yaml's ORIGINAL_DST cluster needs one address in the header")
		}
		checkStandaloneEnvoy(t, v, r, pod.Spec, cm)
	}
	admin := servicePort(r.services[adminSvc], "admin")
	if admin == nil || containerPort(pod.Spec, admin.TargetPort.String()) != int32(port(t, tc.Admin)) {
		t.Errorf("Service %s has no admin port leading to tokenlb's admin %s", adminSvc, tc.Admin)
	}

	if len(r.pools) == 1 {
		checkPool(t, v, r, pod.Labels)
	}
	if len(r.destRules) == 1 {
		checkDestinationRule(t, v, r.destRules[0], r.services[helmFullname])
	}
	if v.Provider.Name == "gke" {
		checkGKE(t, v, r)
	}
	if len(r.monitors) == 1 {
		checkServiceMonitor(t, v, r.monitors[0], r, adminSvc)
	}
}

// checkRBAC: the ServiceAccount the pods run as is bound to a Role that
// allows exactly what discovery reads, nothing more.
func checkRBAC(t *testing.T, v chartValues, r *rendered, podSA string) {
	sa, role, rb := r.serviceAccounts[0], r.roles[0], r.roleBindings[0]
	if podSA != sa.Name {
		t.Errorf("pods run as %q, the chart's ServiceAccount is %q", podSA, sa.Name)
	}
	if rb.RoleRef.APIGroup != "rbac.authorization.k8s.io" || rb.RoleRef.Kind != "Role" || rb.RoleRef.Name != role.Name {
		t.Errorf("RoleBinding refers to %+v, want Role %s", rb.RoleRef, role.Name)
	}
	if len(rb.Subjects) != 1 || rb.Subjects[0].Kind != "ServiceAccount" || rb.Subjects[0].Name != sa.Name || rb.Subjects[0].Namespace != helmNS {
		t.Errorf("RoleBinding subjects %+v, want ServiceAccount %s/%s alone", rb.Subjects, helmNS, sa.Name)
	}
	var got []string
	for _, rule := range role.Rules {
		if len(rule.ResourceNames) > 0 || len(rule.NonResourceURLs) > 0 {
			t.Errorf("Role rule %+v: resourceNames or nonResourceURLs", rule)
		}
		for _, g := range rule.APIGroups {
			for _, res := range rule.Resources {
				for _, verb := range rule.Verbs {
					got = append(got, g+"/"+res+":"+verb)
				}
			}
		}
	}
	var want []string
	resources := []string{"discovery.k8s.io/endpointslices"}
	if v.Backends.Source == "inferencePool" {
		resources = []string{"/pods", "inference.networking.k8s.io/inferencepools"}
	}
	for _, res := range resources {
		for _, verb := range []string{"get", "list", "watch"} {
			want = append(want, res+":"+verb)
		}
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("Role allows %v, want exactly %v", got, want)
	}
}

// tokenlbYAML is the part of tokenlb.yaml the chart's checks compare with
// the rendered objects. It is read without the config package, so that the
// checks run while the config package is still learning these keys;
// tokenlb's own parser and validator run on the same file separately.
type tokenlbYAML struct {
	Listen          string `yaml:"listen"`
	Admin           string `yaml:"admin"`
	DestinationList bool   `yaml:"destination_list"`
	TLS             struct {
		SelfSigned     bool   `yaml:"self_signed"`
		CertFile       string `yaml:"cert_file"`
		KeyFile        string `yaml:"key_file"`
		ClientCAFile   string `yaml:"client_ca_file"`
		AllowPlaintext bool   `yaml:"allow_plaintext"`
	} `yaml:"tls"`
	Discovery struct {
		Source     string `yaml:"source"`
		Kubernetes struct {
			Namespace     string `yaml:"namespace"`
			InferencePool string `yaml:"inference_pool"`
			Service       string `yaml:"service"`
			Port          string `yaml:"port"`
			Kubeconfig    string `yaml:"kubeconfig"`
		} `yaml:"kubernetes"`
	} `yaml:"discovery"`
}

func checkTokenlbConfig(t *testing.T, v chartValues, r *rendered, pod corev1.PodSpec, tl corev1.Container, text string) tokenlbYAML {
	var tc tokenlbYAML
	if err := yaml.Unmarshal([]byte(text), &tc); err != nil {
		t.Fatalf("tokenlb.yaml: %v\n%s", err, text)
	}
	var keys map[string]any
	if err := yaml.Unmarshal([]byte(text), &keys); err != nil {
		t.Fatal(err)
	}
	for k := range v.Config.Extra {
		if _, ok := keys[k]; !ok {
			t.Errorf("config.extra's %s is not in tokenlb.yaml", k)
		}
	}
	k := tc.Discovery.Kubernetes
	if tc.Discovery.Source != "kubernetes" || k.Namespace != "" || k.Kubeconfig != "" {
		t.Errorf("discovery %+v: want source kubernetes, in tokenlb's own namespace, in the cluster", tc.Discovery)
	}
	if v.Backends.Source == "service" {
		if k.Service != v.Backends.Service.Name || k.Port != v.Backends.Service.Port || k.InferencePool != "" {
			t.Errorf("discovery.kubernetes %+v, want service %q port %q", k, v.Backends.Service.Name, v.Backends.Service.Port)
		}
	} else {
		want := v.InferencePool.Name
		if v.InferencePool.Create {
			want = r.pools[0].Metadata.Name
		}
		if k.InferencePool != want || want == "" || k.Service != "" {
			t.Errorf("discovery.kubernetes %+v, want inference_pool %q", k, want)
		}
	}

	// TLS: what the values chose, the files in the mounted Secret.
	tlsDir := ""
	if v.Mode == "gateway" {
		switch v.TLS.Mode {
		case "selfSigned":
			if !tc.TLS.SelfSigned || tc.TLS.CertFile != "" || tc.TLS.AllowPlaintext {
				t.Errorf("tls %+v, want self_signed alone", tc.TLS)
			}
		case "secret":
			tlsDir = mountedSecret(t, pod, tl, v.TLS.Secret.Name)
			s := v.TLS.Secret
			caFile := ""
			if s.ClientCAKey != "" {
				caFile = tlsDir + "/" + s.ClientCAKey
			}
			if tlsDir == "" || tc.TLS.CertFile != tlsDir+"/"+s.CertKey || tc.TLS.KeyFile != tlsDir+"/"+s.KeyKey ||
				tc.TLS.ClientCAFile != caFile || tc.TLS.SelfSigned || tc.TLS.AllowPlaintext {
				t.Errorf("tls %+v, want the files of Secret %s mounted at %q", tc.TLS, s.Name, tlsDir)
			}
		case "plaintext":
			if !tc.TLS.AllowPlaintext || tc.TLS.SelfSigned || tc.TLS.CertFile != "" {
				t.Errorf("tls %+v, want allow_plaintext alone", tc.TLS)
			}
		}
	} else if tc.TLS != (tokenlbYAML{}).TLS {
		t.Errorf("standalone: tls %+v, want none (loopback)", tc.TLS)
	}

	// tokenlb's own parser and validator: unknown or misspelled keys,
	// bad values. The Secret's files are stood in for by real ones.
	t.Run("tokenlb.yaml validates", func(t *testing.T) {
		b := text
		if tlsDir != "" {
			dir := t.TempDir()
			writeTestCert(t, dir, v.TLS.Secret.CertKey, v.TLS.Secret.KeyKey, v.TLS.Secret.ClientCAKey)
			b = strings.ReplaceAll(b, tlsDir+"/", dir+"/")
		}
		cfg := tokenlbConfig(t, []byte(b))
		if cfg.Discovery.Source != "kubernetes" || cfg.Listen != tc.Listen || cfg.DestinationList != tc.DestinationList {
			t.Errorf("config package read discovery.source %q, listen %s, destination_list %v; the file says %q, %s, %v",
				cfg.Discovery.Source, cfg.Listen, cfg.DestinationList, tc.Discovery.Source, tc.Listen, tc.DestinationList)
		}
	})
	return tc
}

// checkProbes: the kubelet's probes reach what tokenlb really serves. Its
// gRPC probes speak plaintext to the pod's IP, so the ext_proc port's
// liveness and readiness services serve them only when that port is
// plaintext on every interface; otherwise the admin port's /healthz and
// /readyz do.
func checkProbes(t *testing.T, v chartValues, tl corev1.Container) {
	if tl.StartupProbe == nil || tl.LivenessProbe == nil || tl.ReadinessProbe == nil {
		t.Fatalf("tokenlb probes: startup %v, liveness %v, readiness %v", tl.StartupProbe, tl.LivenessProbe, tl.ReadinessProbe)
	}
	probes := []struct {
		what     string
		p        *corev1.Probe
		service  string // gRPC health service
		httpPath string
	}{
		{"startup", tl.StartupProbe, "liveness", "/healthz"},
		{"liveness", tl.LivenessProbe, "liveness", "/healthz"},
		{"readiness", tl.ReadinessProbe, "readiness", "/readyz"},
	}
	for _, pr := range probes {
		if v.Mode == "gateway" && v.TLS.Mode == "plaintext" {
			g := pr.p.GRPC
			if g == nil || g.Port != 9002 || g.Service == nil || *g.Service != pr.service {
				t.Errorf("%s probe %+v, want gRPC on 9002, service %s", pr.what, pr.p.ProbeHandler, pr.service)
			}
			continue
		}
		h := pr.p.HTTPGet
		if h == nil || h.Path != pr.httpPath || h.Port.String() != "admin" || containerPort(corev1.PodSpec{Containers: []corev1.Container{tl}}, "admin") == 0 {
			t.Errorf("%s probe %+v, want GET %s on the admin port", pr.what, pr.p.ProbeHandler, pr.httpPath)
		}
	}
}

// checkStandaloneEnvoy: Envoy runs deploy/envoy.yaml, byte for byte, and
// its Service leads to the listener that file opens.
func checkStandaloneEnvoy(t *testing.T, v chartValues, r *rendered, pod corev1.PodSpec, cm corev1.ConfigMap) {
	envoy := pod.Containers[0]
	i := slices.Index(envoy.Args, "-c")
	if i < 0 || i+1 >= len(envoy.Args) {
		t.Fatalf("envoy args %v load no config", envoy.Args)
	}
	dir, file := path.Split(envoy.Args[i+1])
	if mountedConfigMap(t, pod, envoy, strings.TrimSuffix(dir, "/")) != cm.Name {
		t.Fatalf("envoy's -c %s is not in ConfigMap %s", envoy.Args[i+1], cm.Name)
	}
	want, err := os.ReadFile("envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if cm.Data[file] != string(want) {
		t.Errorf("the ConfigMap's %s is not deploy/envoy.yaml byte for byte", file)
	}
	listener, _ := envoyPorts(t)
	svc := r.services[helmFullname]
	http := servicePort(svc, "http")
	if http == nil || containerPort(corev1.PodSpec{Containers: []corev1.Container{envoy}}, http.TargetPort.String()) != int32(listener) {
		t.Errorf("Service %s does not lead to Envoy's listener port %d: %+v", helmFullname, listener, svc.Spec.Ports)
	} else if http.Port != v.Service.Port || string(svc.Spec.Type) != v.Service.Type {
		t.Errorf("Service %s: %s port %d, want %s port %d", helmFullname, svc.Spec.Type, http.Port, v.Service.Type, v.Service.Port)
	}
}

// checkPool: the InferencePool selects the pods the values name, on their
// ports, and (gateway mode) names tokenlb's Service as its picker.
func checkPool(t *testing.T, v chartValues, r *rendered, podLabels map[string]string) {
	p := r.pools[0]
	wantName := v.InferencePool.Name
	if wantName == "" {
		wantName = helmFullname
	}
	if p.Metadata.Name != wantName {
		t.Errorf("InferencePool %s, want %s", p.Metadata.Name, wantName)
	}
	if !maps.Equal(p.Spec.Selector.MatchLabels, v.InferencePool.ModelServers.MatchLabels) || len(p.Spec.Selector.MatchLabels) == 0 {
		t.Errorf("pool selects %v, values give %v", p.Spec.Selector.MatchLabels, v.InferencePool.ModelServers.MatchLabels)
	}
	if subset(p.Spec.Selector.MatchLabels, podLabels) {
		t.Errorf("pool selector %v selects tokenlb's own pods", p.Spec.Selector.MatchLabels)
	}
	if !slices.Equal(p.Spec.TargetPorts, v.InferencePool.TargetPorts) {
		t.Errorf("pool targetPorts %v, values give %v", p.Spec.TargetPorts, v.InferencePool.TargetPorts)
	}
	ref := p.Spec.EndpointPickerRef
	if ref.Group != nil && *ref.Group != "" || ref.Kind != "" && ref.Kind != "Service" || ref.Port == nil {
		t.Fatalf("endpointPickerRef %+v: want a Service (core group) with a port", ref)
	}
	if v.Mode != "gateway" {
		// Standalone: no picker Service, so that a Gateway pointed at
		// this pool fails rather than send ext_proc to Envoy.
		if _, ok := r.services[ref.Name]; ok || ref.FailureMode != "FailClose" {
			t.Errorf("standalone pool's endpointPickerRef %+v names a rendered Service or fails open", ref)
		}
		return
	}
	svc, ok := r.services[ref.Name]
	sp := servicePort(svc, "grpc")
	if !ok || sp == nil || sp.Port != ref.Port.Number {
		t.Errorf("endpointPickerRef %s:%d is not tokenlb's Service and gRPC port (%v)", ref.Name, ref.Port.Number, r.services)
	}
	if ref.FailureMode != v.InferencePool.FailureMode {
		t.Errorf("failureMode %q, values give %q", ref.FailureMode, v.InferencePool.FailureMode)
	}
}

func checkDestinationRule(t *testing.T, v chartValues, dr destinationRule, svc corev1.Service) {
	if want := svc.Name + "." + helmNS + ".svc.cluster.local"; dr.Spec.Host != want {
		t.Errorf("DestinationRule host %s, want %s", dr.Spec.Host, want)
	}
	pls := dr.Spec.TrafficPolicy.PortLevelSettings
	grpc := servicePort(svc, "grpc")
	// Mutual TLS when tokenlb asks for a client certificate.
	mode := "SIMPLE"
	if v.TLS.Mode == "secret" && v.TLS.Secret.ClientCAKey != "" {
		mode = "MUTUAL"
	}
	if len(pls) != 1 || grpc == nil || pls[0].Port.Number != grpc.Port || pls[0].TLS.Mode != mode {
		t.Fatalf("DestinationRule port settings %+v: want TLS (%s) on the gRPC port alone, the admin port is plain HTTP", pls, mode)
	}
	tls := pls[0].TLS
	dv := v.Provider.Istio.DestinationRule
	skip := tls.InsecureSkipVerify != nil && *tls.InsecureSkipVerify
	if tls.CredentialName != dv.CredentialName || skip != (dv.CredentialName == "") || !slices.Equal(tls.SubjectAltNames, dv.SubjectAltNames) {
		t.Errorf("DestinationRule tls %+v for values %+v: verify with the CA given, skip verification without one", tls, dv)
	}
}

func checkGKE(t *testing.T, v chartValues, r *rendered) {
	for kind, p := range r.gke {
		if tr := p.Spec.TargetRef; tr.Group != "inference.networking.k8s.io" || tr.Kind != "InferencePool" || tr.Name != r.pools[0].Metadata.Name {
			t.Errorf("%s targets %+v, want the InferencePool %s", kind, tr, r.pools[0].Metadata.Name)
		}
	}
	hc := r.gke["HealthCheckPolicy"].Spec.Default
	if hc.Config == nil || hc.Config.Type != "HTTP" || hc.Config.HTTPHealthCheck.RequestPath != v.Provider.GKE.HealthCheckPath ||
		hc.Config.HTTPHealthCheck.Port != v.InferencePool.TargetPorts[0].Number || hc.TimeoutSec != 0 {
		t.Errorf("HealthCheckPolicy %+v, want HTTP %s on port %d", hc, v.Provider.GKE.HealthCheckPath, v.InferencePool.TargetPorts[0].Number)
	}
	if bp := r.gke["GCPBackendPolicy"].Spec.Default; bp.TimeoutSec != v.Provider.GKE.TimeoutSec || bp.Config != nil {
		t.Errorf("GCPBackendPolicy %+v, want timeoutSec %d", bp, v.Provider.GKE.TimeoutSec)
	}
}

// checkServiceMonitor: it selects the Service with tokenlb's admin port,
// and only that one, and scrapes /metrics there.
func checkServiceMonitor(t *testing.T, v chartValues, sm serviceMonitor, r *rendered, adminSvc string) {
	var selected []string
	for name, s := range r.services {
		if subset(sm.Spec.Selector.MatchLabels, s.Labels) {
			selected = append(selected, name)
		}
	}
	if len(selected) != 1 || selected[0] != adminSvc {
		t.Errorf("ServiceMonitor selects Services %v, want %s alone", selected, adminSvc)
	}
	if len(sm.Spec.Endpoints) != 1 {
		t.Fatalf("ServiceMonitor endpoints %+v", sm.Spec.Endpoints)
	}
	ep := sm.Spec.Endpoints[0]
	if servicePort(r.services[adminSvc], ep.Port) == nil || ep.Path != "/metrics" || ep.Interval != v.ServiceMonitor.Interval {
		t.Errorf("ServiceMonitor endpoint %+v, want /metrics on %s's admin port every %s", ep, adminSvc, v.ServiceMonitor.Interval)
	}
	if !subset(v.ServiceMonitor.Labels, sm.Metadata.Labels) {
		t.Errorf("ServiceMonitor labels %v lack %v (what Prometheus selects it by)", sm.Metadata.Labels, v.ServiceMonitor.Labels)
	}
}

// subset reports whether every label of sel is in labels.
func subset(sel, labels map[string]string) bool {
	for k, v := range sel {
		if lv, ok := labels[k]; !ok || lv != v {
			return false
		}
	}
	return true
}

// containerPort returns the number of the pod's container port named (or
// numbered) p, 0 if there is none.
func containerPort(pod corev1.PodSpec, p string) int32 {
	for _, c := range pod.Containers {
		for _, cp := range c.Ports {
			if cp.Name == p || strconv.Itoa(int(cp.ContainerPort)) == p {
				return cp.ContainerPort
			}
		}
	}
	return 0
}

func servicePort(s corev1.Service, name string) *corev1.ServicePort {
	for i, p := range s.Spec.Ports {
		if p.Name == name {
			return &s.Spec.Ports[i]
		}
	}
	return nil
}

// mountedConfigMap returns the ConfigMap that container c has mounted at dir.
func mountedConfigMap(t *testing.T, pod corev1.PodSpec, c corev1.Container, dir string) string {
	t.Helper()
	for _, m := range c.VolumeMounts {
		if path.Clean(m.MountPath) != path.Clean(dir) || m.SubPath != "" {
			continue
		}
		for _, vol := range pod.Volumes {
			if vol.Name == m.Name && vol.ConfigMap != nil {
				return vol.ConfigMap.Name
			}
		}
	}
	return ""
}

// mountedSecret returns where container c has Secret name mounted whole
// (not by subPath, which would miss a renewed certificate).
func mountedSecret(t *testing.T, pod corev1.PodSpec, c corev1.Container, name string) string {
	t.Helper()
	for _, vol := range pod.Volumes {
		if vol.Secret == nil || vol.Secret.SecretName != name {
			continue
		}
		for _, m := range c.VolumeMounts {
			if m.Name == vol.Name && m.SubPath == "" {
				return path.Clean(m.MountPath)
			}
		}
	}
	t.Errorf("Secret %s is not mounted whole in container %s", name, c.Name)
	return ""
}

// writeTestCert writes a self-signed certificate and its key into dir, as
// the Secret's keys would be; the CA file, when named, is the same
// certificate.
func writeTestCert(t *testing.T, dir, certName, keyName, caName string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: helmFullname},
		DNSNames:     []string{helmFullname + "." + helmNS + ".svc"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IsCA:         true, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	files := map[string][]byte{certName: certPEM, keyName: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})}
	if caName != "" {
		files[caName] = certPEM
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}
