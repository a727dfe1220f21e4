//go:build kube

package e2e

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/tokenlb/tokenlb/discovery"
	"github.com/tokenlb/tokenlb/internal/envoycfg"
	"github.com/tokenlb/tokenlb/internal/testkube"
)

// kubeFleet is a real API server whose Pods play vLLM pods: with no
// kubelet, the test sets each Pod's IP (a loopback address where a test
// backend listens) and readiness itself.
type kubeFleet struct {
	t        *testing.T
	client   kubernetes.Interface
	port     int
	backends map[string]*backend // by pod name
}

const kubeNamespace = "llm"

func newKubeFleet(t *testing.T) (*kubeFleet, *testkube.Cluster) {
	cluster := testkube.Start(t)
	cluster.CreateNamespace(t, kubeNamespace)
	cluster.InstallCRD(t, discovery.InferencePoolResource, "InferencePool")
	// A port free on 127.0.0.1 is very likely free on the other loopback
	// addresses too; every pod listens on it, as pods of one Deployment do.
	return &kubeFleet{t: t, client: cluster.Client(t), port: freePort(t), backends: map[string]*backend{}}, cluster
}

// addPod starts a backend on 127.0.0.<ip> and creates its Pod, ready or not.
func (f *kubeFleet) addPod(name string, ip int, ready bool) *backend {
	t := f.t
	t.Helper()
	addr := net.JoinHostPort(fmt.Sprintf("127.0.0.%d", ip), strconv.Itoa(f.port))
	b := startBackendOn(t, addr)
	f.backends[name] = b
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app": "vllm"}},
		// A node name makes deletion graceful: the Pod stays, terminating,
		// until a kubelet (here: nobody) confirms it stopped.
		Spec: corev1.PodSpec{NodeName: "node-1", Containers: []corev1.Container{{Name: "vllm", Image: "vllm"}}},
	}
	ctx := context.Background()
	created, err := f.client.CoreV1().Pods(kubeNamespace).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	created.Status.PodIP = fmt.Sprintf("127.0.0.%d", ip)
	created.Status.Phase = corev1.PodRunning
	f.setReady(created, ready)
	return b
}

// setReady sets the pod's Ready condition through the status subresource.
func (f *kubeFleet) setReady(pod *corev1.Pod, ready bool) {
	f.t.Helper()
	status := corev1.ConditionFalse
	if ready {
		status = corev1.ConditionTrue
	}
	pod.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: status, LastTransitionTime: metav1.Now()}}
	if _, err := f.client.CoreV1().Pods(kubeNamespace).UpdateStatus(context.Background(), pod, metav1.UpdateOptions{}); err != nil {
		f.t.Fatal(err)
	}
}

func (f *kubeFleet) pod(name string) *corev1.Pod {
	f.t.Helper()
	p, err := f.client.CoreV1().Pods(kubeNamespace).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		f.t.Fatal(err)
	}
	return p
}

func (f *kubeFleet) delete(name string, grace int64) {
	f.t.Helper()
	err := f.client.CoreV1().Pods(kubeNamespace).Delete(context.Background(), name, metav1.DeleteOptions{GracePeriodSeconds: &grace})
	if err != nil {
		f.t.Fatal(err)
	}
}

// listed reports whether tokenlb's /debug/hosts lists addr as routable.
func listed(tl *tokenlb, addr string) bool {
	for _, h := range tl.hostLoads() {
		if h.Address == addr && !h.Removed {
			return true
		}
	}
	return false
}

// TestKubernetesPoolThroughEnvoy: tokenlb follows an InferencePool on a
// real API server, with only the Role the Helm chart grants, while Envoy
// and tokenlb serve a steady load: a pod that becomes ready gets traffic,
// one that fails readiness, and one that terminates in a rolling update,
// get no new request once tokenlb has seen it, a deleted pod leaves, no
// request fails, and every host's load returns to 0.
func TestKubernetesPoolThroughEnvoy(t *testing.T) {
	fleet, cluster := newKubeFleet(t)
	read := []string{"get", "list", "watch"}
	cluster.Grant(t, kubeNamespace, "tokenlb",
		rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: read},
		rbacv1.PolicyRule{APIGroups: []string{discovery.InferencePoolResource.Group}, Resources: []string{"inferencepools"}, Verbs: read})
	b0 := fleet.addPod("vllm-0", 2, true)
	b1 := fleet.addPod("vllm-1", 3, true)
	pool := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
		"metadata": map[string]any{"name": "pool"},
		"spec": map[string]any{"selector": map[string]any{"matchLabels": map[string]any{"app": "vllm"}},
			"targetPorts":       []any{map[string]any{"number": int64(fleet.port)}},
			"endpointPickerRef": map[string]any{"name": "tokenlb", "port": map[string]any{"number": int64(9002)}}},
	}}
	dyn, err := dynamic.NewForConfig(cluster.Config())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dyn.Resource(discovery.InferencePoolResource).Namespace(kubeNamespace).Create(context.Background(), pool, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	tl := startTokenlb(t, nil, "--discovery=kubernetes", "--inference-pool=pool", "--k8s-namespace="+kubeNamespace,
		"--kubeconfig="+cluster.Kubeconfig(t, kubeNamespace, "tokenlb"))
	s := &stack{tokenlb: tl, byAddr: map[string]*backend{b0.addr: b0, b1.addr: b1}, backends: []*backend{b0, b1}}
	s.envoy = startEnvoy(t, envoyOpts{config: "envoy.yaml", Options: envoycfg.Options{TokenlbPort: tl.grpcPort}})
	if h := tl.host(b0.addr); h.Pod != "vllm-0" || h.Namespace != kubeNamespace || h.Source != "kubernetes inferencepool llm/pool" {
		t.Fatalf("/debug/hosts shows %s as %+v, want pod vllm-0 of %s from the pool", b0.addr, h, kubeNamespace)
	}
	stop := s.steadyLoad(t, 20)

	// Scale up: a pod that is not ready gets nothing; once ready, traffic.
	b2 := fleet.addPod("vllm-2", 4, false)
	fleet.setReady(fleet.pod("vllm-2"), true)
	waitFor(t, 5*time.Second, "the new ready pod gets a request", func() bool { return b2.requests.Load() > 0 })

	// Readiness fails: no new request once tokenlb has seen it (allowing
	// 1 s for requests already routed to arrive).
	fleet.setReady(fleet.pod("vllm-0"), false)
	waitFor(t, 5*time.Second, "tokenlb drops the unready pod", func() bool { return !listed(tl, b0.addr) })
	time.Sleep(time.Second) // the allowance itself, not a synchronisation
	after0 := b0.requests.Load()

	// Rolling update: the replacement is ready, then the old pod
	// terminates (it stays, terminating, since no kubelet confirms).
	b3 := fleet.addPod("vllm-1-next", 5, true)
	fleet.delete("vllm-1", 30)
	waitFor(t, 5*time.Second, "tokenlb drops the terminating pod", func() bool { return !listed(tl, b1.addr) })
	time.Sleep(time.Second)
	after1 := b1.requests.Load()
	waitFor(t, 5*time.Second, "the replacement gets a request", func() bool { return b3.requests.Load() > 0 })
	fleet.delete("vllm-0", 0)

	time.Sleep(2 * time.Second) // more load on the new set
	sent, failures := stop()
	if len(failures) > 0 {
		t.Fatalf("%d of %d requests failed during the changes: %s", len(failures), sent, strings.Join(failures, "; "))
	}
	if n := b0.requests.Load(); n != after0 {
		t.Fatalf("the unready pod got %d requests more than 1 s after tokenlb dropped it", n-after0)
	}
	if n := b1.requests.Load(); n != after1 {
		t.Fatalf("the terminating pod got %d requests more than 1 s after tokenlb dropped it", n-after1)
	}
	tl.waitIdle()
	if got := tl.metric("tokenlb_sweeper_reclaimed_tokens_total"); got != 0 {
		t.Fatalf("the sweeper reclaimed %v tokens", got)
	}
	t.Logf("%d requests through the changes, none failed", sent)
}
