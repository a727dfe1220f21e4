package discovery

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

// InferencePoolResource is the Gateway API Inference Extension's
// InferencePool, read with the dynamic client (its Go module is not
// needed for the few fields read).
var InferencePoolResource = schema.GroupVersionResource{Group: "inference.networking.k8s.io", Version: "v1", Resource: "inferencepools"}

// Kubernetes is the kubernetes source: the ready endpoints of an
// InferencePool (each ready Pod its selector matches, on each of its
// targetPorts) or of a Service (its EndpointSlices), followed through
// informers. A Pod that is not Ready, or is terminating, is not an
// endpoint: it gets no new request, and its requests in flight finish.
//
// It reads, in Namespace: pods and inferencepools (a pool), or
// endpointslices (a Service); get, list and watch, nothing else.
type Kubernetes struct {
	// Client reads everything (the typed clients would bring every API
	// group's types along and triple the binary).
	Client    dynamic.Interface
	Namespace string
	// Exactly one of InferencePool and Service.
	InferencePool, Service string
	// Port is the Service's port: its name, or the pods' port number; ""
	// when the EndpointSlices have one port.
	Port   string
	Logger *slog.Logger
	// Errors counts sets that could not be read (no pool, a pool without
	// target ports) or were empty; the running set is kept. nil counts
	// nothing.
	Errors prometheus.Counter

	once    sync.Once
	stop    context.CancelFunc // ends the informers (Stop)
	running sync.WaitGroup     // the informers' goroutines
	changed chan struct{}      // a watched object changed
	pods    cache.SharedIndexInformer
	pools   cache.SharedIndexInformer
	slices  cache.SharedIndexInformer
}

// KubernetesConfig returns the client configuration: the kubeconfig file
// when given, else the pod's service account; and the namespace to read
// when none is set: the kubeconfig context's, or the pod's own.
func KubernetesConfig(kubeconfig string) (*rest.Config, string, error) {
	if kubeconfig == "" {
		cfg, err := rest.InClusterConfig()
		if err != nil {
			return nil, "", fmt.Errorf("discovery: kubernetes: not in a pod (set discovery.kubernetes.kubeconfig to run outside a cluster): %w", err)
		}
		ns, err := os.ReadFile("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
		if err != nil {
			return nil, "", fmt.Errorf("discovery: kubernetes: the pod's namespace: %w", err)
		}
		return cfg, strings.TrimSpace(string(ns)), nil
	}
	cc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(
		&clientcmd.ClientConfigLoadingRules{ExplicitPath: kubeconfig}, &clientcmd.ConfigOverrides{})
	cfg, err := cc.ClientConfig()
	if err != nil {
		return nil, "", fmt.Errorf("discovery: kubernetes: kubeconfig %s: %w", kubeconfig, err)
	}
	ns, _, err := cc.Namespace()
	if err != nil {
		return nil, "", fmt.Errorf("discovery: kubernetes: kubeconfig %s: %w", kubeconfig, err)
	}
	return cfg, ns, nil
}

// Name says what is followed, for logs and /debug/hosts.
func (k *Kubernetes) Name() string {
	if k.InferencePool != "" {
		return "kubernetes inferencepool " + k.Namespace + "/" + k.InferencePool
	}
	return "kubernetes service " + k.Namespace + "/" + k.Service
}

func (k *Kubernetes) init() {
	k.once.Do(func() {
		k.changed = make(chan struct{}, 1)
		notify := cache.ResourceEventHandlerFuncs{
			AddFunc:    func(any) { k.notify() },
			UpdateFunc: func(any, any) { k.notify() },
			DeleteFunc: func(any) { k.notify() },
		}
		if k.InferencePool != "" {
			k.pods = k.informer(podResource, nil, trimPod)
			k.pods.AddEventHandler(notify)
			k.pools = k.informer(InferencePoolResource, func(o *metav1.ListOptions) {
				o.FieldSelector = fields.OneTermEqualSelector("metadata.name", k.InferencePool).String()
			}, nil)
			k.pools.AddEventHandler(notify)
			return
		}
		k.slices = k.informer(sliceResource, func(o *metav1.ListOptions) {
			o.LabelSelector = labels.SelectorFromSet(labels.Set{discoveryv1.LabelServiceName: k.Service}).String()
		}, typed[discoveryv1.EndpointSlice])
		k.slices.AddEventHandler(notify)
	})
}

var (
	podResource   = schema.GroupVersionResource{Version: "v1", Resource: "pods"}
	sliceResource = schema.GroupVersionResource{Group: "discovery.k8s.io", Version: "v1", Resource: "endpointslices"}
)

// informer watches resource in k.Namespace, the list narrowed by tweak,
// each object turned by transform before it is stored.
func (k *Kubernetes) informer(resource schema.GroupVersionResource, tweak func(*metav1.ListOptions), transform cache.TransformFunc) cache.SharedIndexInformer {
	c := k.Client.Resource(resource).Namespace(k.Namespace)
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			if tweak != nil {
				tweak(&o)
			}
			return c.List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			if tweak != nil {
				tweak(&o)
			}
			return c.Watch(ctx, o)
		},
	}
	i := cache.NewSharedIndexInformer(cache.ToListWatcherWithWatchListSemantics(lw, k.Client), &unstructured.Unstructured{}, 0, cache.Indexers{})
	if transform != nil {
		i.SetTransform(transform)
	}
	return i
}

// typed turns an unstructured object into its Go type.
func typed[T any](obj any) (any, error) {
	u, ok := obj.(*unstructured.Unstructured)
	if !ok {
		return obj, nil // a deletion tombstone
	}
	t := new(T)
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, t); err != nil {
		return nil, err
	}
	return t, nil
}

func (k *Kubernetes) notify() {
	select {
	case k.changed <- struct{}{}:
	default:
	}
}

// Start starts the informers and waits until they have listed everything
// and the set has an endpoint (or ctx ends), logging why while it waits.
// It returns that first set; Run then follows it. The informers outlive
// ctx: they run until Run returns, or Stop (Start stops them itself when
// it fails).
func (k *Kubernetes) Start(ctx context.Context) (eps []Endpoint, err error) {
	k.init()
	informers, cancel := context.WithCancel(context.WithoutCancel(ctx))
	k.stop = cancel
	defer func() {
		if err != nil {
			k.Stop()
		}
	}()
	var synced []cache.InformerSynced
	for _, i := range []cache.SharedIndexInformer{k.pods, k.pools, k.slices} {
		if i != nil {
			k.running.Go(func() { i.RunWithContext(informers) })
			synced = append(synced, i.HasSynced)
		}
	}
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		return nil, fmt.Errorf("discovery: %s: not listed: %w", k.Name(), context.Cause(ctx))
	}
	log := k.logger()
	for {
		eps, err := k.Endpoints()
		if err == nil {
			return eps, nil
		}
		log.Warn("waiting for a ready endpoint", "source", k.Name(), "err", err)
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("discovery: %s: %w", k.Name(), err)
		case <-k.changed:
		case <-time.After(5 * time.Second): // only to repeat the log line
		}
	}
}

// Stop ends the informers that Start started and waits for them.
func (k *Kubernetes) Stop() {
	if k.stop != nil {
		k.stop()
	}
	k.running.Wait()
}

// Run reports each new set until ctx is done, then stops the informers.
// Start must have returned.
func (k *Kubernetes) Run(ctx context.Context, initial []Endpoint, update func([]Endpoint)) {
	defer k.Stop()
	log := k.logger()
	last := slices.Clone(initial)
	for {
		select {
		case <-ctx.Done():
			return
		case <-k.changed:
		}
		next, err := k.Endpoints()
		if err != nil {
			if k.Errors != nil {
				k.Errors.Inc()
			}
			log.Warn("no endpoint: keeping the running ones", "source", k.Name(), "err", err)
			continue
		}
		if slices.EqualFunc(next, last, func(a, b Endpoint) bool { return a.Address == b.Address && a.Pod == b.Pod }) {
			continue
		}
		last = next
		update(next)
	}
}

func (k *Kubernetes) logger() *slog.Logger {
	if k.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return k.Logger
}

// errNoEndpoint is an empty set: kept out of the fleet, like a DNS name
// without an address, so that one bad read never empties it.
var errNoEndpoint = errors.New("no ready endpoint")

// Endpoints returns the ready endpoints now, sorted by address.
func (k *Kubernetes) Endpoints() ([]Endpoint, error) {
	k.init()
	var out []Endpoint
	var err error
	if k.InferencePool != "" {
		out, err = k.poolEndpoints()
	} else {
		out, err = k.serviceEndpoints()
	}
	if err != nil {
		return nil, err
	}
	if len(out) == 0 {
		return nil, errNoEndpoint
	}
	slices.SortFunc(out, func(a, b Endpoint) int {
		return netip.MustParseAddrPort(a.Address).Compare(netip.MustParseAddrPort(b.Address))
	})
	return slices.CompactFunc(out, func(a, b Endpoint) bool { return a.Address == b.Address }), nil
}

// inferencePool is what tokenlb reads of an InferencePool's spec.
type inferencePool struct {
	Spec struct {
		Selector struct {
			MatchLabels map[string]string `json:"matchLabels"`
		} `json:"selector"`
		TargetPorts []struct {
			Number int32 `json:"number"`
		} `json:"targetPorts"`
	} `json:"spec"`
}

func (k *Kubernetes) poolEndpoints() ([]Endpoint, error) {
	obj, ok, err := k.pools.GetStore().GetByKey(k.Namespace + "/" + k.InferencePool)
	if err != nil || !ok {
		return nil, fmt.Errorf("no InferencePool %s in namespace %s", k.InferencePool, k.Namespace)
	}
	u, ok := obj.(*unstructured.Unstructured)
	if !ok {
		return nil, fmt.Errorf("InferencePool %s: unexpected %T", k.InferencePool, obj)
	}
	var pool inferencePool
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &pool); err != nil {
		return nil, fmt.Errorf("InferencePool %s: %w", k.InferencePool, err)
	}
	if len(pool.Spec.TargetPorts) == 0 {
		return nil, fmt.Errorf("InferencePool %s has no targetPorts", k.InferencePool)
	}
	if len(pool.Spec.Selector.MatchLabels) == 0 {
		return nil, fmt.Errorf("InferencePool %s selects nothing (no matchLabels)", k.InferencePool)
	}
	sel := labels.SelectorFromSet(pool.Spec.Selector.MatchLabels)
	var out []Endpoint
	for _, obj := range k.pods.GetStore().List() {
		p := obj.(*corev1.Pod)
		ip, ok := readyPodIP(p)
		if !ok || !sel.Matches(labels.Set(p.Labels)) {
			continue
		}
		for _, tp := range pool.Spec.TargetPorts {
			out = append(out, Endpoint{Address: net.JoinHostPort(ip, strconv.Itoa(int(tp.Number))),
				Source: k.Name(), Namespace: p.Namespace, Pod: p.Name})
		}
	}
	return out, nil
}

// readyPodIP returns the pod's IP if it may take new requests: it has
// one, its Ready condition is True, and it is not terminating.
func readyPodIP(p *corev1.Pod) (string, bool) {
	if p.DeletionTimestamp != nil || p.Status.PodIP == "" {
		return "", false
	}
	if _, err := netip.ParseAddr(p.Status.PodIP); err != nil {
		return "", false
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return p.Status.PodIP, c.Status == corev1.ConditionTrue
		}
	}
	return "", false
}

func (k *Kubernetes) serviceEndpoints() ([]Endpoint, error) {
	var out []Endpoint
	seen := map[string]bool{} // pods already listed: a dual-stack Service lists each in two slices
	all := k.slices.GetStore().List()
	slices.SortFunc(all, func(a, b any) int { // IPv4 first, then by name: one family per pod, the same each time
		x, y := a.(*discoveryv1.EndpointSlice), b.(*discoveryv1.EndpointSlice)
		return strings.Compare(string(x.AddressType)+"/"+x.Name, string(y.AddressType)+"/"+y.Name)
	})
	for _, obj := range all {
		s := obj.(*discoveryv1.EndpointSlice)
		if s.AddressType != discoveryv1.AddressTypeIPv4 && s.AddressType != discoveryv1.AddressTypeIPv6 {
			continue
		}
		port, err := k.slicePort(s)
		if err != nil {
			return nil, err
		}
		if port == 0 {
			continue
		}
		for _, e := range s.Endpoints {
			if !serving(e.Conditions) {
				continue
			}
			ep := Endpoint{Source: k.Name(), Namespace: s.Namespace}
			if r := e.TargetRef; r != nil && r.Kind == "Pod" {
				if seen[r.Name] {
					continue
				}
				ep.Pod = r.Name
				seen[r.Name] = true
			}
			for _, a := range e.Addresses {
				if _, err := netip.ParseAddr(a); err == nil {
					ep.Address = net.JoinHostPort(a, strconv.Itoa(int(port)))
					out = append(out, ep)
				}
			}
		}
	}
	return out, nil
}

// serving reports whether an EndpointSlice endpoint may take new requests:
// its pod is ready (serving, which stays true to readiness even where a
// Service publishes unready addresses and so marks every endpoint ready;
// ready when serving is not reported; unset means ready, the API's rule)
// and it is not terminating.
func serving(c discoveryv1.EndpointConditions) bool {
	if c.Terminating != nil && *c.Terminating {
		return false
	}
	if c.Serving != nil {
		return *c.Serving
	}
	return c.Ready == nil || *c.Ready
}

// slicePort returns the port of s that Port names (0: s has none of that
// name), or an error when Port is "" and s has more than one.
func (k *Kubernetes) slicePort(s *discoveryv1.EndpointSlice) (int32, error) {
	var found []int32
	for _, p := range s.Ports {
		if p.Port == nil || p.Protocol != nil && *p.Protocol != corev1.ProtocolTCP {
			continue
		}
		name := ""
		if p.Name != nil {
			name = *p.Name
		}
		if k.Port == "" || k.Port == name || k.Port == strconv.Itoa(int(*p.Port)) {
			found = append(found, *p.Port)
		}
	}
	if len(found) > 1 {
		return 0, fmt.Errorf("service %s has %d ports: set discovery.kubernetes.port to one's name", k.Service, len(found))
	}
	if len(found) == 0 {
		return 0, nil
	}
	return found[0], nil
}

// trimPod keeps of a Pod what readyPodIP and the selector read, so that
// the informer's cache holds no more of a namespace's pods than that.
func trimPod(obj any) (any, error) {
	t, err := typed[corev1.Pod](obj)
	p, ok := t.(*corev1.Pod)
	if err != nil || !ok {
		return t, err
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, Labels: p.Labels,
			ResourceVersion: p.ResourceVersion, DeletionTimestamp: p.DeletionTimestamp, UID: p.UID},
		Status: corev1.PodStatus{PodIP: p.Status.PodIP, Conditions: p.Status.Conditions},
	}, nil
}
