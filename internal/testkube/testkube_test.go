//go:build kube

package testkube

import (
	"context"
	"os"
	"testing"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// discoveryRules is what tokenlb's Kubernetes discovery needs: reading Pods,
// EndpointSlices and InferencePools, nothing more.
var discoveryRules = []rbacv1.PolicyRule{
	{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get", "list", "watch"}},
	{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"get", "list", "watch"}},
	{APIGroups: []string{"inference.networking.k8s.io"}, Resources: []string{"inferencepools"}, Verbs: []string{"get", "list", "watch"}},
}

func TestCluster(t *testing.T) {
	c := Start(t)
	ctx := context.Background()
	admin := c.Client(t)
	const ns = "serving"
	c.CreateNamespace(t, ns)

	// A Pod, with no kubelet: its status is the test's to set.
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "backend-0", Labels: map[string]string{"app": "llm"}},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "llm", Image: "llm:test"}}},
	}
	pod, err := admin.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod.Status.Phase = corev1.PodRunning
	pod.Status.PodIP = "127.0.0.2"
	pod.Status.PodIPs = []corev1.PodIP{{IP: "127.0.0.2"}}
	pod.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: metav1.Now()}}
	if _, err := admin.CoreV1().Pods(ns).UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	got, err := admin.CoreV1().Pods(ns).Get(ctx, "backend-0", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got.Status.PodIP != "127.0.0.2" || !podReady(got) {
		t.Fatalf("pod status read back: ip %q, conditions %+v", got.Status.PodIP, got.Status.Conditions)
	}

	// InferencePools, served from a custom resource definition.
	pools := schema.GroupVersionResource{Group: "inference.networking.k8s.io", Version: "v1", Resource: "inferencepools"}
	c.InstallCRD(t, pools, "InferencePool")

	// A service account granted only what discovery needs, through a
	// kubeconfig file as tokenlb's --kubeconfig would read it.
	c.Grant(t, ns, "tokenlb", discoveryRules...)
	path := c.Kubeconfig(t, ns, "tokenlb")
	if _, err := os.Stat(path); err != nil {
		t.Fatal(err)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		t.Fatal(err)
	}
	limited, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	list, err := limited.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatalf("limited identity listing pods: %v", err)
	}
	if len(list.Items) != 1 || list.Items[0].Status.PodIP != "127.0.0.2" {
		t.Fatalf("limited identity listed %d pods: %+v", len(list.Items), list.Items)
	}
	if _, err := limited.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{}); err != nil {
		t.Fatalf("limited identity listing endpointslices: %v", err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dyn.Resource(pools).Namespace(ns).List(ctx, metav1.ListOptions{}); err != nil {
		t.Fatalf("limited identity listing inferencepools: %v", err)
	}

	// And nothing more.
	forbidden := map[string]func() error{
		"list secrets": func() error {
			_, err := limited.CoreV1().Secrets(ns).List(ctx, metav1.ListOptions{})
			return err
		},
		"list pods in another namespace": func() error {
			_, err := limited.CoreV1().Pods("default").List(ctx, metav1.ListOptions{})
			return err
		},
		"update pod status": func() error {
			_, err := limited.CoreV1().Pods(ns).UpdateStatus(ctx, got, metav1.UpdateOptions{})
			return err
		},
		"delete a pod": func() error {
			return limited.CoreV1().Pods(ns).Delete(ctx, "backend-0", metav1.DeleteOptions{})
		},
	}
	for what, do := range forbidden {
		if err := do(); !apierrors.IsForbidden(err) {
			t.Errorf("limited identity: %s: got %v, want 403 Forbidden", what, err)
		}
	}
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}
