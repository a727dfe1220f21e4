package discovery_test

import (
	"context"
	"encoding/json"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	dynamicfake "k8s.io/client-go/dynamic/fake"

	"github.com/tokenlb/tokenlb/discovery"
)

// These tests run the kubernetes source against client-go's fake clients,
// which list and watch like an API server; e2e's kubernetes tests run it
// against a real one.

const ns = "llm"

type podState struct {
	name, ip    string
	labels      map[string]string
	ready       bool
	terminating bool
}

func pod(s podState) *corev1.Pod {
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: s.name, Namespace: ns, Labels: s.labels},
		Status: corev1.PodStatus{PodIP: s.ip}}
	status := corev1.ConditionFalse
	if s.ready {
		status = corev1.ConditionTrue
	}
	p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodScheduled, Status: corev1.ConditionTrue}, {Type: corev1.PodReady, Status: status}}
	if s.terminating {
		now := metav1.Now()
		p.DeletionTimestamp = &now
	}
	return p
}

func pool(name string, labels map[string]string, ports ...int64) *unstructured.Unstructured {
	var tp []any
	for _, p := range ports {
		tp = append(tp, map[string]any{"number": p})
	}
	match := map[string]any{}
	for k, v := range labels {
		match[k] = v
	}
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
		"metadata": map[string]any{"name": name, "namespace": ns},
		"spec": map[string]any{"selector": map[string]any{"matchLabels": match}, "targetPorts": tp,
			"endpointPickerRef": map[string]any{"name": "tokenlb", "port": map[string]any{"number": int64(9002)}}},
	}}
}

// fakeClient is client-go's fake dynamic client holding objs: it lists
// and watches as an API server does.
func fakeClient(objs ...runtime.Object) *dynamicfake.FakeDynamicClient {
	scheme := runtime.NewScheme()
	corev1.AddToScheme(scheme)
	discoveryv1.AddToScheme(scheme)
	return fakeClientWith(scheme, objs...)
}

// fakeClientWith is fakeClient with the scheme that turns typed objects
// into unstructured ones (an empty one for unstructured objects).
func fakeClientWith(scheme *runtime.Scheme, objs ...runtime.Object) *dynamicfake.FakeDynamicClient {
	return dynamicfake.NewSimpleDynamicClientWithCustomListKinds(scheme,
		map[schema.GroupVersionResource]string{discovery.InferencePoolResource: "InferencePoolList",
			podsResource: "PodList", {Group: "discovery.k8s.io", Version: "v1", Resource: "endpointslices"}: "EndpointSliceList"}, objs...)
}

// unstructuredPod is p as the dynamic client takes it.
func unstructuredPod(t *testing.T, p *corev1.Pod) *unstructured.Unstructured {
	t.Helper()
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(p)
	if err != nil {
		t.Fatal(err)
	}
	u := &unstructured.Unstructured{Object: m}
	u.SetAPIVersion("v1")
	u.SetKind("Pod")
	return u
}

var podsResource = schema.GroupVersionResource{Version: "v1", Resource: "pods"}

func addresses(eps []discovery.Endpoint) []string {
	var out []string
	for _, e := range eps {
		out = append(out, e.Address)
	}
	return out
}

var vllm = map[string]string{"app": "vllm"}

func TestKubernetesPoolEndpoints(t *testing.T) {
	client := fakeClient(pool("pool", vllm, 8000, 8001),
		pod(podState{name: "vllm-0", ip: "10.0.0.1", labels: vllm, ready: true}),
		pod(podState{name: "vllm-1", ip: "10.0.0.2", labels: vllm, ready: false}),                   // not ready
		pod(podState{name: "vllm-2", ip: "10.0.0.3", labels: vllm, ready: true, terminating: true}), // terminating
		pod(podState{name: "vllm-3", labels: vllm, ready: true}),                                    // no IP yet
		pod(podState{name: "other", ip: "10.0.0.5", labels: map[string]string{"app": "sglang"}, ready: true}),
		pod(podState{name: "vllm-4", ip: "fd00::4", labels: map[string]string{"app": "vllm", "zone": "a"}, ready: true}),
	)
	k := &discovery.Kubernetes{Client: client, Namespace: ns, InferencePool: "pool"}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	eps, err := k.Start(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Stop()
	want := []string{"10.0.0.1:8000", "10.0.0.1:8001", "[fd00::4]:8000", "[fd00::4]:8001"}
	if got := addresses(eps); !slices.Equal(got, want) {
		t.Fatalf("endpoints %v, want %v (each ready, running pod of the selector, on each target port)", got, want)
	}
	if e := eps[0]; e.Pod != "vllm-0" || e.Namespace != ns || e.Source != "kubernetes inferencepool llm/pool" {
		t.Fatalf("origin %+v, want pod vllm-0 in %s from the pool", e, ns)
	}
}

// TestKubernetesPoolFollows: the set follows pods becoming ready, failing
// readiness, terminating and going, and the pool's selector and ports
// changing; a set without an endpoint, or no pool, keeps the running one
// and counts an error.
func TestKubernetesPoolFollows(t *testing.T) {
	dyn := fakeClient(pool("pool", vllm, 8000), pod(podState{name: "vllm-0", ip: "10.0.0.1", labels: vllm, ready: true}))
	errs := prometheus.NewCounter(prometheus.CounterOpts{Name: "errors"})
	k := &discovery.Kubernetes{Client: dyn, Namespace: ns, InferencePool: "pool", Errors: errs}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	first, err := k.Start(ctx)
	if err != nil {
		t.Fatal(err)
	}
	updates := make(chan []string, 16)
	go k.Run(ctx, first, func(eps []discovery.Endpoint) { updates <- addresses(eps) })
	next := func(step string, want ...string) {
		t.Helper()
		select {
		case got := <-updates:
			if !slices.Equal(got, want) {
				t.Fatalf("%s: endpoints %v, want %v", step, got, want)
			}
		case <-ctx.Done():
			t.Fatalf("%s: no update (want %v)", step, want)
		}
	}
	pods := dyn.Resource(podsResource).Namespace(ns)
	if _, err := pods.Create(ctx, unstructuredPod(t, pod(podState{name: "vllm-1", ip: "10.0.0.2", labels: vllm})), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// Not ready yet: no update; ready: it joins.
	if _, err := pods.UpdateStatus(ctx, unstructuredPod(t, pod(podState{name: "vllm-1", ip: "10.0.0.2", labels: vllm, ready: true})), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	next("ready", "10.0.0.1:8000", "10.0.0.2:8000")
	if _, err := pods.UpdateStatus(ctx, unstructuredPod(t, pod(podState{name: "vllm-0", ip: "10.0.0.1", labels: vllm, ready: false})), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	next("fails readiness", "10.0.0.2:8000")
	if _, err := pods.UpdateStatus(ctx, unstructuredPod(t, pod(podState{name: "vllm-0", ip: "10.0.0.1", labels: vllm, ready: true})), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	next("ready again", "10.0.0.1:8000", "10.0.0.2:8000")
	if _, err := pods.Update(ctx, unstructuredPod(t, pod(podState{name: "vllm-1", ip: "10.0.0.2", labels: vllm, ready: true, terminating: true})), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	next("terminating", "10.0.0.1:8000")
	pools := dyn.Resource(discovery.InferencePoolResource).Namespace(ns)
	if _, err := pools.Update(ctx, pool("pool", vllm, 8000, 8002), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	next("a second target port", "10.0.0.1:8000", "10.0.0.1:8002")
	// No ready pod, then no pool: the running set stays, with an error each.
	if err := pods.Delete(ctx, "vllm-0", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitCount(t, ctx, errs, 1)
	if err := pools.Delete(ctx, "pool", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitCount(t, ctx, errs, 2)
	if _, err := pools.Create(ctx, pool("pool", map[string]string{"app": "vllm-next"}, 8000), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := pods.Create(ctx, unstructuredPod(t, pod(podState{name: "next-0", ip: "10.0.1.1", labels: map[string]string{"app": "vllm-next"}, ready: true})), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	next("a new pool selecting a new pod", "10.0.1.1:8000")
	select {
	case got := <-updates:
		t.Fatalf("unexpected update %v", got)
	default:
	}
}

// waitCount waits until c has counted n.
func waitCount(t *testing.T, ctx context.Context, c prometheus.Counter, n float64) {
	t.Helper()
	for testutil.ToFloat64(c) < n {
		select {
		case <-ctx.Done():
			t.Fatalf("errors counted %v, want %v", testutil.ToFloat64(c), n)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func slice(name string, ports []discoveryv1.EndpointPort, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{discoveryv1.LabelServiceName: "vllm"}},
		AddressType: discoveryv1.AddressTypeIPv4, Ports: ports, Endpoints: eps,
	}
}

func endpoint(ip, pod string, ready, terminating *bool) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{Addresses: []string{ip}, Conditions: discoveryv1.EndpointConditions{Ready: ready, Terminating: terminating},
		TargetRef: &corev1.ObjectReference{Kind: "Pod", Name: pod, Namespace: ns}}
}

func withServing(e discoveryv1.Endpoint, serving bool) discoveryv1.Endpoint {
	e.Conditions.Serving = &serving
	return e
}

func ipv6(s *discoveryv1.EndpointSlice) *discoveryv1.EndpointSlice {
	s.AddressType = discoveryv1.AddressTypeIPv6
	return s
}

func port(name string, n int32) discoveryv1.EndpointPort {
	return discoveryv1.EndpointPort{Name: &name, Port: &n}
}

func TestKubernetesServiceEndpoints(t *testing.T) {
	yes, no := new(bool), new(bool)
	*yes = true
	one := []discoveryv1.EndpointPort{port("http", 8000)}
	two := []discoveryv1.EndpointPort{port("http", 8000), port("metrics", 9100)}
	other := slice("other-abc", one, endpoint("10.9.9.9", "other", yes, nil))
	other.Labels[discoveryv1.LabelServiceName] = "other"
	objs := []runtime.Object{
		slice("vllm-abc", one,
			endpoint("10.0.0.1", "vllm-0", yes, nil),
			endpoint("10.0.0.2", "vllm-1", nil, nil), // ready unset: ready
			endpoint("10.0.0.3", "vllm-2", no, nil),  // not ready
			endpoint("10.0.0.4", "vllm-3", no, yes),  // terminating
		),
		slice("vllm-def", one, endpoint("10.0.0.5", "vllm-4", yes, nil)),
		other,
	}
	for _, tc := range []struct {
		name    string
		objs    []runtime.Object
		port    string
		want    []string
		wantErr bool
	}{
		{name: "ready endpoints of every slice", objs: objs, want: []string{"10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.5:8000"}},
		{name: "port by name", objs: objs, port: "http", want: []string{"10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.5:8000"}},
		{name: "port by number", objs: []runtime.Object{slice("vllm-abc", two, endpoint("10.0.0.1", "vllm-0", yes, nil))}, port: "9100", want: []string{"10.0.0.1:9100"}},
		{name: "two ports, none named", objs: []runtime.Object{slice("vllm-abc", two, endpoint("10.0.0.1", "vllm-0", yes, nil))}, wantErr: true},
		{name: "no port of that name", objs: objs, port: "grpc", wantErr: true},
		{name: "unready addresses published: serving decides", objs: []runtime.Object{slice("vllm-abc", one,
			endpoint("10.0.0.1", "vllm-0", yes, nil), withServing(endpoint("10.0.0.2", "vllm-1", yes, nil), false))},
			want: []string{"10.0.0.1:8000"}},
		{name: "dual stack: one address per pod", objs: []runtime.Object{
			slice("vllm-abc", one, endpoint("10.0.0.1", "vllm-0", yes, nil)),
			ipv6(slice("vllm-v6", one, endpoint("fd00::1", "vllm-0", yes, nil), endpoint("fd00::2", "vllm-6", yes, nil)))},
			want: []string{"10.0.0.1:8000", "[fd00::2]:8000"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := &discovery.Kubernetes{Client: fakeClient(tc.objs...), Namespace: ns, Service: "vllm", Port: tc.port}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if tc.wantErr {
				ctx, cancel = context.WithTimeout(ctx, 200*time.Millisecond) // Start waits for an endpoint
				defer cancel()
			}
			eps, err := k.Start(ctx)
			defer k.Stop()
			if tc.wantErr {
				if err == nil {
					t.Fatalf("endpoints %v, want an error", addresses(eps))
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := addresses(eps); !slices.Equal(got, tc.want) {
				t.Fatalf("endpoints %v, want %v", got, tc.want)
			}
			if eps[0].Pod != "vllm-0" || eps[0].Source != "kubernetes service llm/vllm" {
				t.Fatalf("origin %+v", eps[0])
			}
		})
	}
}

// The fleet TestKubernetesAPIServer creates on a real API server and
// records (recordedFile), and TestKubernetesRecorded reads back into the
// fake client.
const recordedFile = "testdata/apiserver.json"

var recordedPods = []podState{
	{name: "vllm-0", ip: "10.0.0.1", labels: vllm, ready: true},
	{name: "vllm-1", ip: "10.0.0.2", labels: vllm},                                           // not ready
	{name: "vllm-2", ip: "10.0.0.3", labels: vllm, ready: true, terminating: true},           // terminating
	{name: "vllm-3", labels: vllm, ready: true},                                              // no IP yet
	{name: "other", ip: "10.0.0.5", labels: map[string]string{"app": "sglang"}, ready: true}, // another app
}

func recordedPool() *unstructured.Unstructured { return pool("pool", vllm, 8000, 8001) }

func recordedSlices() []*discoveryv1.EndpointSlice {
	yes, no := new(bool), new(bool)
	*yes = true
	http := []discoveryv1.EndpointPort{port("http", 8000)}
	other := slice("other-abc", http, endpoint("10.9.9.9", "other", yes, nil))
	other.Labels[discoveryv1.LabelServiceName] = "other"
	return []*discoveryv1.EndpointSlice{
		slice("vllm-abc", http,
			endpoint("10.0.0.1", "vllm-0", yes, nil),
			endpoint("10.0.0.2", "vllm-1", nil, nil), // ready unset: ready
			endpoint("10.0.0.3", "vllm-2", no, nil),  // not ready
			endpoint("10.0.0.4", "vllm-3", no, yes),  // terminating
		),
		slice("vllm-def", http, endpoint("10.0.0.5", "vllm-4", yes, nil)),
		other,
	}
}

var recordedCases = []struct {
	name, serviceAccount, pool, service string
	want                                []string
}{
	{"pool", "pool-reader", "pool", "", []string{"10.0.0.1:8000", "10.0.0.1:8001"}},
	{"service", "service-reader", "", "vllm", []string{"10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.5:8000"}},
}

// TestKubernetesRecorded runs the source on the objects a real API server
// returned for recordedPods, recordedPool and recordedSlices (make
// test-kube, with -record, writes them; TestKubernetesAPIServer checks the
// same sets against the server itself).
func TestKubernetesRecorded(t *testing.T) {
	b, err := os.ReadFile(recordedFile)
	if err != nil {
		t.Fatal(err)
	}
	var items []json.RawMessage
	if err := json.Unmarshal(b, &items); err != nil {
		t.Fatal(err)
	}
	var objs []runtime.Object
	for _, raw := range items {
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(raw); err != nil { // integers as int64, as the API machinery wants
			t.Fatal(err)
		}
		objs = append(objs, u)
	}
	if len(objs) != len(recordedPods)+1+len(recordedSlices()) {
		t.Fatalf("%s holds %d objects, want every pod, the pool and every slice", recordedFile, len(objs))
	}
	for _, tc := range recordedCases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			k := &discovery.Kubernetes{Client: fakeClientWith(runtime.NewScheme(), objs...), Namespace: ns, InferencePool: tc.pool, Service: tc.service}
			eps, err := k.Start(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer k.Stop()
			if got := addresses(eps); !slices.Equal(got, tc.want) {
				t.Fatalf("endpoints %v, want %v", got, tc.want)
			}
		})
	}
}
