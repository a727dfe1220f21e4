//go:build kube

package discovery_test

import (
	"context"
	"encoding/json"
	"flag"
	"os"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/tokenlb/tokenlb/discovery"
	"github.com/tokenlb/tokenlb/internal/testkube"
)

var record = flag.Bool("record", false, "write the objects the real API server returned to "+recordedFile)

// TestKubernetesAPIServer runs the kubernetes source against a real API
// server, as service accounts holding only the Helm chart's Role: the
// pool's ready pods on each target port, the Service's ready endpoints.
// With -record it writes what the server returned for the fake-client
// test that make test runs (TestKubernetesRecorded).
func TestKubernetesAPIServer(t *testing.T) {
	cluster := testkube.Start(t)
	cluster.CreateNamespace(t, ns)
	cluster.InstallCRD(t, discovery.InferencePoolResource, "InferencePool")
	read := []string{"get", "list", "watch"}
	cluster.Grant(t, ns, "pool-reader",
		rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: read},
		rbacv1.PolicyRule{APIGroups: []string{discovery.InferencePoolResource.Group}, Resources: []string{"inferencepools"}, Verbs: read})
	cluster.Grant(t, ns, "service-reader",
		rbacv1.PolicyRule{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: read})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	admin := cluster.Client(t)
	for _, s := range recordedPods {
		p := pod(s)
		p.Spec = corev1.PodSpec{NodeName: "node-1", Containers: []corev1.Container{{Name: "vllm", Image: "vllm"}}}
		status, deleting := p.Status, p.DeletionTimestamp != nil
		p.Status, p.DeletionTimestamp = corev1.PodStatus{}, nil
		created, err := admin.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		created.Status = status
		if _, err := admin.CoreV1().Pods(ns).UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		if deleting { // graceful: it stays, terminating, with no kubelet to confirm
			if err := admin.CoreV1().Pods(ns).Delete(ctx, p.Name, metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, s := range recordedSlices() {
		if _, err := admin.DiscoveryV1().EndpointSlices(ns).Create(ctx, s, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	dynAdmin, err := dynamic.NewForConfig(cluster.Config())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dynAdmin.Resource(discovery.InferencePoolResource).Namespace(ns).Create(ctx, recordedPool(), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	for _, tc := range recordedCases {
		client, err := dynamic.NewForConfig(cluster.ConfigFor(t, ns, tc.serviceAccount))
		if err != nil {
			t.Fatal(err)
		}
		k := &discovery.Kubernetes{Client: client, Namespace: ns, InferencePool: tc.pool, Service: tc.service}
		eps, err := k.Start(ctx)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		k.Stop()
		if got := addresses(eps); !slices.Equal(got, tc.want) {
			t.Fatalf("%s: endpoints %v, want %v", tc.name, got, tc.want)
		}
	}
	if *record {
		writeRecorded(t, ctx, dynAdmin)
	}
}

// writeRecorded saves the namespace's pods, pools and EndpointSlices as the
// API server returns them.
func writeRecorded(t *testing.T, ctx context.Context, client dynamic.Interface) {
	var objs []map[string]any
	for _, r := range []schema.GroupVersionResource{
		{Version: "v1", Resource: "pods"}, discovery.InferencePoolResource,
		{Group: "discovery.k8s.io", Version: "v1", Resource: "endpointslices"},
	} {
		list, err := client.Resource(r).Namespace(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, item := range list.Items {
			unstructured.RemoveNestedField(item.Object, "metadata", "managedFields")
			objs = append(objs, item.Object)
		}
	}
	b, err := json.MarshalIndent(objs, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(recordedFile, append(b, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %d objects to %s", len(objs), recordedFile)
}
