// Package testkube runs a real Kubernetes API server for tests: etcd and
// kube-apiserver, built from their Go modules by scripts/kube.sh, on free
// loopback ports, with everything they need in the test's temporary
// directory. There is no kubelet, scheduler or controller manager: a test
// creates Pods and sets their status itself (UpdateStatus).
//
// The binaries are found through KUBE_TOOLS_DIR (a directory holding
// kube-apiserver and etcd, as scripts/kube.sh prints). Without it Start skips
// the test, except under CI=true, where it fails it.
package testkube

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// StartTimeout bounds how long Start waits for etcd and then kube-apiserver
// to report ready. Both are usually ready in seconds; the margin is for a
// loaded 2-core machine running the race detector.
var StartTimeout = 2 * time.Minute

// Cluster is a running etcd and kube-apiserver, stopped at the end of the
// test that started it.
type Cluster struct {
	// Host is the API server's URL, https://127.0.0.1:port.
	Host string
	// CAData is the PEM certificate of the CA that signed the API server's
	// serving certificate and the admin's client certificate.
	CAData []byte
	// Dir holds the certificates, keys, etcd's data and both logs.
	Dir string

	admin *rest.Config
}

// ToolsDir returns the directory holding kube-apiserver and etcd, from
// KUBE_TOOLS_DIR. Without it the test is skipped, or failed when CI=true.
func ToolsDir(t testing.TB) string {
	t.Helper()
	dir := os.Getenv("KUBE_TOOLS_DIR")
	why := "KUBE_TOOLS_DIR is not set"
	if dir != "" {
		why = ""
		for _, b := range []string{"kube-apiserver", "etcd"} {
			if fi, err := os.Stat(filepath.Join(dir, b)); err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
				why = fmt.Sprintf("KUBE_TOOLS_DIR=%s has no executable %s", dir, b)
				break
			}
		}
	}
	if why == "" {
		return dir
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("testkube: %s: failing, as CI must run the Kubernetes tests (scripts/kube.sh builds the binaries)", why)
	}
	t.Skipf("testkube: SKIPPED, %s; run KUBE_TOOLS_DIR=\"$(scripts/kube.sh)\"", why)
	return ""
}

// Start starts etcd and kube-apiserver and waits until the API server's
// /readyz answers 200. Both are killed, process group and all, when the test
// ends.
func Start(t testing.TB) *Cluster {
	t.Helper()
	tools := ToolsDir(t)
	begin := time.Now()
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), StartTimeout)
	defer cancel()

	pki, err := newPKI(dir)
	if err != nil {
		t.Fatalf("testkube: certificates: %v", err)
	}
	ports := freePorts(t, 4)
	etcdClient := startEtcd(t, ctx, dir, filepath.Join(tools, "etcd"), ports[:3])
	etcdReady := time.Since(begin)

	port := ports[3]
	host := "https://127.0.0.1:" + strconv.Itoa(port)
	apiserver := start(t, dir, "kube-apiserver", filepath.Join(tools, "kube-apiserver"),
		"--etcd-servers="+etcdClient,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port="+strconv.Itoa(port),
		"--tls-cert-file="+pki.serverCert,
		"--tls-private-key-file="+pki.serverKey,
		"--client-ca-file="+pki.ca,
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+pki.saPub,
		"--service-account-signing-key-file="+pki.saKey,
		"--service-cluster-ip-range=10.96.0.0/24",
		// No controller manager makes each namespace's default service
		// account, which this plugin requires of every Pod.
		"--disable-admission-plugins=ServiceAccount",
		// Nothing else runs: no kubernetes Service endpoints to keep.
		"--endpoint-reconciler-type=none",
		"--profiling=false",
		"--v=1",
	)
	admin := &rest.Config{
		Host: host,
		TLSClientConfig: rest.TLSClientConfig{
			CAData:   pki.caPEM,
			CertData: pki.adminCertPEM,
			KeyData:  pki.adminKeyPEM,
		},
		QPS:   -1, // no client-side rate limit
		Burst: -1,
	}
	hc, err := rest.HTTPClientFor(admin)
	if err != nil {
		t.Fatal(err)
	}
	hc.Timeout = 5 * time.Second
	ready := func() bool {
		resp, err := hc.Get(host + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}
	if err := waitReady(ctx, apiserver, ready); err != nil {
		t.Fatalf("testkube: kube-apiserver at %s: %v\n%s", host, err, apiserver.tail(60))
	}
	hc.CloseIdleConnections()
	t.Logf("testkube: kube-apiserver ready at %s after %v (etcd after %v)", host,
		time.Since(begin).Round(time.Millisecond), etcdReady.Round(time.Millisecond))
	return &Cluster{Host: host, CAData: pki.caPEM, Dir: dir, admin: admin}
}

// startEtcd starts etcd on the given client, peer and metrics ports and
// waits until it reports itself healthy; it returns its client URL.
func startEtcd(t testing.TB, ctx context.Context, dir, bin string, ports []int) string {
	t.Helper()
	etcdClient := "http://127.0.0.1:" + strconv.Itoa(ports[0])
	etcdPeer := "http://127.0.0.1:" + strconv.Itoa(ports[1])
	etcd := start(t, dir, "etcd", bin,
		"--name=testkube",
		"--data-dir="+filepath.Join(dir, "etcd-data"),
		"--listen-client-urls="+etcdClient,
		"--advertise-client-urls="+etcdClient,
		"--listen-peer-urls="+etcdPeer,
		"--initial-advertise-peer-urls="+etcdPeer,
		"--initial-cluster=testkube="+etcdPeer,
		"--listen-metrics-urls=http://127.0.0.1:"+strconv.Itoa(ports[2]),
		"--unsafe-no-fsync", // a throwaway store: durability buys nothing
		"--log-level=warn",
	)
	probe := &http.Client{Timeout: 5 * time.Second}
	etcdHealthy := func() bool {
		resp, err := probe.Get(etcdClient + "/health")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		var b bytes.Buffer
		b.ReadFrom(resp.Body)
		return resp.StatusCode == http.StatusOK && strings.Contains(b.String(), `"health":"true"`)
	}
	if err := waitReady(ctx, etcd, etcdHealthy); err != nil {
		t.Fatalf("testkube: etcd at %s: %v\n%s", etcdClient, err, etcd.tail(40))
	}
	return etcdClient
}

// Config returns a client configuration with cluster-admin rights (a client
// certificate in the system:masters group).
func (c *Cluster) Config() *rest.Config { return rest.CopyConfig(c.admin) }

// Client returns a clientset with cluster-admin rights.
func (c *Cluster) Client(t testing.TB) *kubernetes.Clientset {
	t.Helper()
	cs, err := kubernetes.NewForConfig(c.Config())
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

// CreateNamespace creates a namespace, if it is not there yet.
func (c *Cluster) CreateNamespace(t testing.TB, name string) {
	t.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if _, err := c.Client(t).CoreV1().Namespaces().Create(context.Background(), ns, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("testkube: namespace %s: %v", name, err)
	}
}

// ConfigFor returns a client configuration that authenticates as service
// account serviceAccount of namespace, as a pod running under it would: a
// bearer token from the TokenRequest API. The namespace and the service
// account are created if missing. The identity has only what RBAC grants
// it (see Grant); by default, nothing beyond discovery.
func (c *Cluster) ConfigFor(t testing.TB, namespace, serviceAccount string) *rest.Config {
	t.Helper()
	ctx := context.Background()
	c.CreateNamespace(t, namespace)
	sas := c.Client(t).CoreV1().ServiceAccounts(namespace)
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: serviceAccount}}
	if _, err := sas.Create(ctx, sa, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("testkube: service account %s/%s: %v", namespace, serviceAccount, err)
	}
	expiry := int64(24 * 3600)
	tr, err := sas.CreateToken(ctx, serviceAccount, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &expiry},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("testkube: token for %s/%s: %v", namespace, serviceAccount, err)
	}
	return &rest.Config{
		Host:            c.Host,
		TLSClientConfig: rest.TLSClientConfig{CAData: c.CAData},
		BearerToken:     tr.Status.Token,
		QPS:             -1,
		Burst:           -1,
	}
}

// Kubeconfig writes a kubeconfig file for service account serviceAccount of
// namespace (as ConfigFor) and returns its path.
func (c *Cluster) Kubeconfig(t testing.TB, namespace, serviceAccount string) string {
	t.Helper()
	return WriteKubeconfig(t, c.ConfigFor(t, namespace, serviceAccount), namespace)
}

// AdminKubeconfig writes a kubeconfig file with cluster-admin rights and
// returns its path.
func (c *Cluster) AdminKubeconfig(t testing.TB) string {
	t.Helper()
	return WriteKubeconfig(t, c.Config(), "default")
}

// WriteKubeconfig writes cfg (a Host, CA data and client certificate data or
// a bearer token) as a kubeconfig file whose current context has namespace,
// into a fresh temporary directory, and returns its path.
func WriteKubeconfig(t testing.TB, cfg *rest.Config, namespace string) string {
	t.Helper()
	kc := clientcmdapi.NewConfig()
	kc.Clusters["testkube"] = &clientcmdapi.Cluster{Server: cfg.Host, CertificateAuthorityData: cfg.CAData}
	kc.AuthInfos["testkube"] = &clientcmdapi.AuthInfo{
		ClientCertificateData: cfg.CertData,
		ClientKeyData:         cfg.KeyData,
		Token:                 cfg.BearerToken,
	}
	kc.Contexts["testkube"] = &clientcmdapi.Context{Cluster: "testkube", AuthInfo: "testkube", Namespace: namespace}
	kc.CurrentContext = "testkube"
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := clientcmd.WriteToFile(*kc, path); err != nil {
		t.Fatal(err)
	}
	return path
}

// Grant gives service account serviceAccount of namespace the rules, in
// that namespace alone: a Role and a RoleBinding, both named after the
// service account. It returns once the API server's authorizer allows the
// first rule's first verb, so a request made next sees the grant.
func (c *Cluster) Grant(t testing.TB, namespace, serviceAccount string, rules ...rbacv1.PolicyRule) {
	t.Helper()
	ctx := context.Background()
	cs := c.Client(t)
	c.CreateNamespace(t, namespace)
	role := &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: serviceAccount}, Rules: rules}
	if _, err := cs.RbacV1().Roles(namespace).Create(ctx, role, metav1.CreateOptions{}); err != nil {
		t.Fatalf("testkube: role %s/%s: %v", namespace, serviceAccount, err)
	}
	rb := &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: serviceAccount},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: serviceAccount},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: serviceAccount, Namespace: namespace}},
	}
	if _, err := cs.RbacV1().RoleBindings(namespace).Create(ctx, rb, metav1.CreateOptions{}); err != nil {
		t.Fatalf("testkube: role binding %s/%s: %v", namespace, serviceAccount, err)
	}
	if len(rules) == 0 || len(rules[0].Verbs) == 0 || len(rules[0].Resources) == 0 {
		return
	}
	r := rules[0]
	group := ""
	if len(r.APIGroups) > 0 {
		group = r.APIGroups[0]
	}
	user := "system:serviceaccount:" + namespace + ":" + serviceAccount
	sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
		User:   user,
		Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + namespace, "system:authenticated"},
		ResourceAttributes: &authorizationv1.ResourceAttributes{
			Namespace: namespace, Verb: r.Verbs[0], Group: group, Resource: r.Resources[0],
		},
	}}
	deadline := time.Now().Add(30 * time.Second)
	for {
		got, err := cs.AuthorizationV1().SubjectAccessReviews().Create(ctx, sar, metav1.CreateOptions{})
		if err == nil && got.Status.Allowed {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("testkube: %s still not allowed to %s %s after 30s (err %v)", user, r.Verbs[0], r.Resources[0], err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// InstallCRD creates a namespaced custom resource definition for gvr (its
// Resource the plural) with kind, whose schema keeps any fields and which has
// a status subresource, and waits until the API server serves it. Enough for
// tests that read and write such objects as unstructured ones.
func (c *Cluster) InstallCRD(t testing.TB, gvr schema.GroupVersionResource, kind string) {
	t.Helper()
	ctx := context.Background()
	crdGVR := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	dyn, err := dynamic.NewForConfig(c.Config())
	if err != nil {
		t.Fatal(err)
	}
	name := gvr.Resource + "." + gvr.Group
	crd := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "apiextensions.k8s.io/v1",
		"kind":       "CustomResourceDefinition",
		"metadata": map[string]any{"name": name, "annotations": map[string]any{
			// Required of groups under k8s.io and kubernetes.io, such as
			// inference.networking.k8s.io; "unapproved" is accepted.
			"api-approved.kubernetes.io": "unapproved, a test-only definition from internal/testkube",
		}},
		"spec": map[string]any{
			"group": gvr.Group,
			"scope": "Namespaced",
			"names": map[string]any{
				"plural":   gvr.Resource,
				"singular": strings.ToLower(kind),
				"kind":     kind,
				"listKind": kind + "List",
			},
			"versions": []any{map[string]any{
				"name":         gvr.Version,
				"served":       true,
				"storage":      true,
				"subresources": map[string]any{"status": map[string]any{}},
				"schema": map[string]any{"openAPIV3Schema": map[string]any{
					"type":                                 "object",
					"x-kubernetes-preserve-unknown-fields": true,
				}},
			}},
		},
	}}
	if _, err := dyn.Resource(crdGVR).Create(ctx, crd, metav1.CreateOptions{}); err != nil {
		t.Fatalf("testkube: CRD %s: %v", name, err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := dyn.Resource(gvr).Namespace("default").List(ctx, metav1.ListOptions{Limit: 1})
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("testkube: CRD %s not served after 30s: %v", name, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// process is a child process whose whole process group is killed at test
// cleanup.
type process struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	log  string
}

func start(t testing.TB, dir, name, bin string, args ...string) *process {
	t.Helper()
	logPath := filepath.Join(dir, name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	p := &process{name: name, cmd: exec.Command(bin, args...), done: make(chan struct{}), log: logPath}
	p.cmd.Stdout, p.cmd.Stderr = f, f
	p.cmd.Dir = dir
	// A group of its own, to kill whatever it starts; killed with the test
	// binary too, even when a timeout skips the cleanups.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		f.Close()
		t.Fatalf("testkube: %s: %v", name, err)
	}
	f.Close()
	go func() { p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
		if t.Failed() {
			t.Logf("testkube: %s log (%s), last lines:\n%s", name, logPath, p.tail(40))
		}
	})
	return p
}

func (p *process) tail(n int) string {
	b, _ := os.ReadFile(p.log)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// waitReady polls ready every 50 ms until it holds, the process exits, or ctx
// ends.
func waitReady(ctx context.Context, p *process, ready func() bool) error {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for !ready() {
		select {
		case <-p.done:
			return fmt.Errorf("exited early (%v)", p.cmd.ProcessState)
		case <-ctx.Done():
			return errors.New("not ready before the deadline")
		case <-tick.C:
		}
	}
	return nil
}

// freePorts returns n distinct loopback ports that were free a moment ago.
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports
}

// pki is the files and PEM data Start makes: one CA that signs the API
// server's serving certificate and the admin's client certificate (and is
// the API server's client CA), and the service-account signing key.
type pki struct {
	ca, serverCert, serverKey, saKey, saPub string
	caPEM, adminCertPEM, adminKeyPEM        []byte
}

func newPKI(dir string) (*pki, error) {
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	caTmpl := &x509.Certificate{SerialNumber: serial(), Subject: pkix.Name{CommonName: "testkube CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(48 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	leaf := func(tmpl *x509.Certificate) (certPEM, keyPEM []byte, err error) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, nil, err
		}
		tmpl.SerialNumber = serial()
		tmpl.NotBefore, tmpl.NotAfter = now.Add(-time.Hour), now.Add(48*time.Hour)
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return nil, nil, err
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return nil, nil, err
		}
		return pemBytes("CERTIFICATE", der), pemBytes("PRIVATE KEY", keyDER), nil
	}
	serverCert, serverKey, err := leaf(&x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:    []string{"localhost"},
	})
	if err != nil {
		return nil, err
	}
	// system:masters: every request is authorized, whatever RBAC says.
	adminCert, adminKey, err := leaf(&x509.Certificate{
		Subject:     pkix.Name{CommonName: "testkube-admin", Organization: []string{"system:masters"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		return nil, err
	}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	saDER, err := x509.MarshalPKCS8PrivateKey(saKey)
	if err != nil {
		return nil, err
	}
	saPubDER, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return nil, err
	}
	p := &pki{
		ca: filepath.Join(dir, "ca.pem"), serverCert: filepath.Join(dir, "apiserver.pem"),
		serverKey: filepath.Join(dir, "apiserver-key.pem"),
		saKey:     filepath.Join(dir, "sa-key.pem"), saPub: filepath.Join(dir, "sa-pub.pem"),
		caPEM: pemBytes("CERTIFICATE", caDER), adminCertPEM: adminCert, adminKeyPEM: adminKey,
	}
	for path, data := range map[string][]byte{p.ca: p.caPEM, p.serverCert: serverCert, p.serverKey: serverKey,
		p.saKey: pemBytes("PRIVATE KEY", saDER), p.saPub: pemBytes("PUBLIC KEY", saPubDER)} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			return nil, err
		}
	}
	return p, nil
}

func pemBytes(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	return n
}
