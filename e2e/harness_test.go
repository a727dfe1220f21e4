// Package e2e runs tokenlb inside a real Envoy 1.40 with real HTTP backends,
// all on loopback, and checks what a client sees.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tokenlb/tokenlb/internal/envoycfg"
	"github.com/tokenlb/tokenlb/internal/proc"
)

var (
	repoRoot   string
	tokenlbBin string
	envoyBin   string
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	wd, _ := os.Getwd()
	repoRoot = filepath.Dir(wd)
	dir, err := os.MkdirTemp("", "tokenlb-e2e")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	tokenlbBin = filepath.Join(dir, "tokenlb")
	if err := proc.Build(repoRoot, dir, "./cmd/tokenlb"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	// ENVOY_BIN, else scripts/envoy.sh finds or installs Envoy 1.40.
	envoyBin, err = proc.FindEnvoy(repoRoot)
	if err != nil {
		if os.Getenv("CI") == "true" {
			fmt.Fprintf(os.Stderr, "e2e: no Envoy 1.40 (%v): failing, as CI must run the e2e suite\n", err)
			return 1
		}
		fmt.Fprintf(os.Stderr, "e2e: SKIPPED, no Envoy 1.40 (%v); run `make tools`\n", err)
		return 0
	}
	return m.Run()
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// waitFor polls cond every 20 ms until it holds, failing after timeout.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// process is a child process stopped at test cleanup.
type process struct {
	cmd  *exec.Cmd
	done chan struct{}
	log  *syncBuffer
}

// syncBuffer is a process's output, read while the process writes it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func startProcess(t testing.TB, name string, args ...string) *process {
	t.Helper()
	p := &process{cmd: exec.Command(name, args...), done: make(chan struct{}), log: &syncBuffer{}}
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	// Killed with the test binary, even when a timeout skips the cleanups.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("%s output:\n%s", filepath.Base(name), lastLines(p.log.String(), 40))
		}
	})
	return p
}

func (p *process) kill() {
	p.cmd.Process.Kill()
	<-p.done
}

func lastLines(s string, n int) string {
	lines := strings.Split(s, "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// tokenlb is a running tokenlb process.
type tokenlb struct {
	grpcPort, adminPort int
	hosts               []string
	args                []string // extra flags
	proc                *process
	t                   testing.TB
}

func startTokenlb(t testing.TB, hosts []string, args ...string) *tokenlb {
	t.Helper()
	tl := &tokenlb{grpcPort: freePort(t), adminPort: freePort(t), hosts: hosts, t: t, args: args}
	tl.start()
	return tl
}

func (tl *tokenlb) start() {
	t := tl.t
	t.Helper()
	tl.proc = startProcess(t, tokenlbBin, append([]string{
		"--listen", fmt.Sprintf("127.0.0.1:%d", tl.grpcPort),
		"--admin", fmt.Sprintf("127.0.0.1:%d", tl.adminPort),
		"--hosts", strings.Join(tl.hosts, ","),
		"--log-level", "debug"}, tl.args...)...)
	waitFor(t, 30*time.Second, "tokenlb ready", func() bool {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/readyz", tl.adminPort))
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
}

type hostLoad struct {
	Address          string `json:"address"`
	InFlightTokens   int64  `json:"in_flight_tokens"`
	PrefillingTokens int64  `json:"prefilling_tokens"`
	InFlightRequests int64  `json:"in_flight_requests"`
	Picks            int64  `json:"picks"`
	Health           struct {
		Down   bool   `json:"down"`
		Reason string `json:"reason"`
	} `json:"health"`
	Models    []string `json:"models"`
	Removed   bool     `json:"removed"`
	Source    string   `json:"source"`
	Namespace string   `json:"namespace"`
	Pod       string   `json:"pod"`
}

// host returns addr's entry of /debug/hosts.
func (tl *tokenlb) host(addr string) hostLoad {
	tl.t.Helper()
	for _, h := range tl.hostLoads() {
		if h.Address == addr {
			return h
		}
	}
	tl.t.Fatalf("/debug/hosts has no %s", addr)
	return hostLoad{}
}

func (tl *tokenlb) hostLoads() []hostLoad {
	tl.t.Helper()
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/debug/hosts", tl.adminPort))
	if err != nil {
		tl.t.Fatal(err)
	}
	defer resp.Body.Close()
	var v struct{ Hosts []hostLoad }
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		tl.t.Fatal(err)
	}
	return v.Hosts
}

func (tl *tokenlb) idle() bool {
	for _, h := range tl.hostLoads() {
		if h.InFlightTokens != 0 || h.InFlightRequests != 0 {
			return false
		}
	}
	return true
}

func (tl *tokenlb) waitIdle() {
	tl.t.Helper()
	waitFor(tl.t, 10*time.Second, "every host at 0 in-flight tokens", tl.idle)
}

func (tl *tokenlb) metric(name string) float64 {
	tl.t.Helper()
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", tl.adminPort))
	if err != nil {
		tl.t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	return 0
}

// envoyOpts say how to turn a deploy config into a test config.
type envoyOpts struct {
	config  string   // file under deploy/
	tokenlb []string // extra tokenlb flags
	envoycfg.Options
}

type envoy struct {
	port, adminPort int
	proc            *process
}

// startEnvoy starts Envoy on the deploy config with only ports (and, for
// the override-host variant, the endpoint list) rewritten for the test. A
// free port can be taken by another process before Envoy binds it: then it
// tries again on other ports, up to three times.
func startEnvoy(t testing.TB, o envoyOpts) *envoy {
	t.Helper()
	for attempt := 1; ; attempt++ {
		e, err := tryEnvoy(t, o)
		if err == nil {
			return e
		}
		if attempt == 3 || !strings.Contains(e.proc.log.String(), "Address already in use") {
			t.Fatalf("envoy exited: %v\n%s", err, e.proc.log.String())
		}
		t.Logf("envoy: a port was taken before it bound it; trying other ports")
	}
}

// tryEnvoy starts Envoy on free ports and waits until it is ready, or
// says that it exited.
func tryEnvoy(t testing.TB, o envoyOpts) (*envoy, error) {
	t.Helper()
	e := &envoy{port: freePort(t), adminPort: freePort(t)}
	o.ListenPort, o.AdminPort = e.port, e.adminPort
	out, err := envoycfg.Render(filepath.Join(repoRoot, "deploy", o.config), o.Options)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "envoy.yaml")
	if err := os.WriteFile(path, out, 0o600); err != nil {
		t.Fatal(err)
	}
	e.proc = startProcess(t, envoyBin, "-c", path, "--disable-hot-restart", "--concurrency", "2", "-l", "warning")
	var exited error
	waitFor(t, 20*time.Second, "envoy ready", func() bool {
		select {
		case <-e.proc.done:
			exited = errors.New("envoy exited")
			return true
		default:
		}
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/ready", e.adminPort))
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	return e, exited
}

func (e *envoy) url(path string) string { return fmt.Sprintf("http://127.0.0.1:%d%s", e.port, path) }

// stat reads one counter or gauge from Envoy's admin.
func (e *envoy) stat(t testing.TB, name string) int {
	t.Helper()
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/stats?filter=^%s$", e.adminPort, name))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	_, v, _ := strings.Cut(strings.TrimSpace(string(b)), ": ")
	n, _ := strconv.Atoi(v)
	return n
}

// clusters returns Envoy's /clusters page: a line per cluster, host and
// stat, "cluster::host::name::value".
func (e *envoy) clusters(t testing.TB) string {
	t.Helper()
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/clusters", e.adminPort))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// hostStat returns the value of one of a cluster's per-host stats
// (cx_active, say) from Envoy's /clusters, or -1 when Envoy lists no such
// host.
func (e *envoy) hostStat(t testing.TB, cluster, host, name string) int {
	t.Helper()
	prefix := cluster + "::" + host + "::" + name + "::"
	for _, line := range strings.Split(e.clusters(t), "\n") {
		if v, ok := strings.CutPrefix(line, prefix); ok {
			n, err := strconv.Atoi(v)
			if err != nil {
				t.Fatalf("/clusters: %q: %v", line, err)
			}
			return n
		}
	}
	return -1
}

// backend is a test HTTP backend on loopback. It answers with a JSON
// description of what it received, streams SSE when asked, and holds a
// request that carries x-e2e-hold until the test releases it.
type backend struct {
	addr string
	srv  *http.Server

	mu        sync.Mutex
	holds     map[string]chan struct{}
	arrived   chan string // hold ids, as held requests arrive
	cancelled chan string // hold ids of held requests whose client went away
	requests  atomic.Int64
	// models are what GET /v1/models lists; fail, when not 0, is the
	// status every request gets at once.
	models []string
	fail   atomic.Int32
}

// received is a backend's answer.
type received struct {
	Backend    string `json:"backend"`
	BodyLen    int    `json:"body_len"`
	BodySHA256 string `json:"body_sha256"`
	Header     string `json:"destination_header"`
}

// startBackend starts a backend that lists models (by default "m", the
// model chatBody asks for).
func startBackend(t testing.TB, models ...string) *backend {
	t.Helper()
	return startBackendOn(t, "127.0.0.1:0", models...)
}

// startBackendOn starts a backend listening on addr (a pod's address, say).
func startBackendOn(t testing.TB, addr string, models ...string) *backend {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	b := &backend{addr: l.Addr().String(), holds: map[string]chan struct{}{}, arrived: make(chan string, 100),
		cancelled: make(chan string, 100), models: models}
	if len(models) == 0 {
		b.models = []string{"m"}
	}
	b.srv = &http.Server{Handler: http.HandlerFunc(b.serve)}
	go b.srv.Serve(l)
	t.Cleanup(func() {
		b.releaseAll()
		b.srv.Close()
	})
	return b
}

// stop closes the backend and every connection to it, as a host dies.
func (b *backend) stop() { b.srv.Close() }

// restart serves again on the same address after stop.
func (b *backend) restart(t testing.TB) {
	t.Helper()
	l, err := net.Listen("tcp", b.addr)
	if err != nil {
		t.Fatal(err)
	}
	b.srv = &http.Server{Handler: http.HandlerFunc(b.serve)}
	go b.srv.Serve(l)
}

func (b *backend) gate(id string) chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.holds[id] == nil {
		b.holds[id] = make(chan struct{})
	}
	return b.holds[id]
}

// release lets the held request id finish.
func (b *backend) release(id string) { close(b.gate(id)) }

func (b *backend) releaseAll() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for id, c := range b.holds {
		select {
		case <-c:
		default:
			close(c)
		}
		delete(b.holds, id)
	}
}

func (b *backend) serve(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.URL.Path == "/health":
		w.Write([]byte("ok"))
		return
	case r.URL.Path == "/v1/models" && r.Method == "GET":
		type model struct {
			ID     string `json:"id"`
			Object string `json:"object"`
		}
		list := struct {
			Object string  `json:"object"`
			Data   []model `json:"data"`
		}{Object: "list"}
		for _, m := range b.models {
			list.Data = append(list.Data, model{m, "model"})
		}
		w.Header().Set("content-type", "application/json")
		json.NewEncoder(w).Encode(list)
		return
	case r.URL.Path == "/metrics":
		http.NotFound(w, r)
		return
	}
	b.requests.Add(1)
	if st := b.fail.Load(); st != 0 {
		w.Header().Set("content-type", "application/json")
		w.WriteHeader(int(st))
		fmt.Fprintf(w, `{"error":{"message":"failing on purpose","type":"server_error","param":null,"code":"e2e"}}`)
		return
	}
	body, _ := io.ReadAll(r.Body)
	sum := sha256.Sum256(body)
	rec := received{Backend: b.addr, BodyLen: len(body), BodySHA256: hex.EncodeToString(sum[:]),
		Header: r.Header.Get("x-gateway-destination-endpoint")}
	var req struct {
		Stream bool `json:"stream"`
	}
	json.Unmarshal(body, &req)
	hold := r.Header.Get("x-e2e-hold")
	var gate chan struct{}
	if hold != "" {
		gate = b.gate(hold)
		b.arrived <- hold
	}
	wait := func(gate chan struct{}) bool {
		if gate == nil {
			return true
		}
		select {
		case <-gate:
			return true
		case <-r.Context().Done():
			b.cancelled <- hold
			return false
		}
	}
	if !req.Stream {
		if !wait(gate) {
			return
		}
		w.Header().Set("content-type", "application/json")
		json.NewEncoder(w).Encode(rec)
		return
	}
	// SSE: the first event at once, the rest after the gate opens.
	w.Header().Set("content-type", "text/event-stream")
	fl := w.(http.Flusher)
	// x-e2e-hold-first: the response headers at once, the first event
	// after the gate <hold>/first opens.
	if hold != "" && r.Header.Get("x-e2e-hold-first") != "" {
		fl.Flush()
		if !wait(b.gate(hold + "/first")) {
			return
		}
	}
	first, _ := json.Marshal(rec)
	fmt.Fprintf(w, "data: %s\n\n", first)
	fl.Flush()
	if !wait(gate) {
		return
	}
	// x-e2e-pace: the time the rest of the stream takes to come.
	if pace, err := time.ParseDuration(r.Header.Get("x-e2e-pace")); err == nil {
		select {
		case <-time.After(pace):
		case <-r.Context().Done():
			return
		}
	}
	// x-e2e-events: this many more events, each written and flushed on
	// its own, 1 ms apart (as a server paces its tokens), so that Envoy
	// sees each as a chunk of its own.
	n, _ := strconv.Atoi(r.Header.Get("x-e2e-events"))
	for range n {
		select {
		case <-time.After(time.Millisecond):
		case <-r.Context().Done():
			return
		}
		fmt.Fprintf(w, "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n")
		fl.Flush()
	}
	fmt.Fprintf(w, "data: {\"last\":true}\n\ndata: [DONE]\n\n")
	fl.Flush()
}

// stack is Envoy + tokenlb + three backends, wired for one deploy config.
type stack struct {
	envoy    *envoy
	tokenlb  *tokenlb
	backends []*backend
	byAddr   map[string]*backend
}

// startStack starts three backends, tokenlb over them, and Envoy on o (its
// tokenlb port and backends filled in).
func startStack(t testing.TB, o envoyOpts) *stack {
	t.Helper()
	s := &stack{byAddr: map[string]*backend{}}
	var addrs []string
	for range 3 {
		b := startBackend(t)
		s.backends = append(s.backends, b)
		s.byAddr[b.addr] = b
		addrs = append(addrs, b.addr)
	}
	s.tokenlb = startTokenlb(t, addrs, o.tokenlb...)
	o.TokenlbPort, o.Backends = s.tokenlb.grpcPort, addrs
	s.envoy = startEnvoy(t, o)
	return s
}

// chatBody is a chat request whose prompt has about words tokens.
//
// It asks for at most 16 output tokens, as clients usually bound theirs: the
// decode part of its charge is then small beside the prefill of a long
// prompt, which is what the routing tests look at (without a bound, each
// request would be charged the 256-token output prior).
func chatBody(words int, stream bool) []byte {
	b, _ := json.Marshal(map[string]any{
		"model":      "m",
		"stream":     stream,
		"max_tokens": 16,
		"messages":   []map[string]string{{"role": "user", "content": strings.Repeat("hello ", words)}},
	})
	return b
}

// send posts body to Envoy; hold, if set, makes the backend hold the request.
func (s *stack) send(ctx context.Context, body []byte, hold string, header map[string]string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, "POST", s.envoy.url("/v1/chat/completions"), bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("content-type", "application/json")
	if hold != "" {
		req.Header.Set("x-e2e-hold", hold)
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	return http.DefaultClient.Do(req)
}

// complete sends a request and decodes the backend's answer.
func (s *stack) complete(t testing.TB, body []byte, header map[string]string) received {
	t.Helper()
	resp, err := s.send(context.Background(), body, "", header)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d: %s", resp.StatusCode, b)
	}
	var rec received
	if err := json.Unmarshal(b, &rec); err != nil {
		t.Fatalf("backend answer %q: %v", b, err)
	}
	return rec
}

// arrival waits for held request id to reach a backend and returns it.
func (s *stack) arrival(t testing.TB, id string) *backend {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		for _, b := range s.backends {
			select {
			case a := <-b.arrived:
				if a != id {
					t.Fatalf("held request %s arrived while waiting for %s", a, id)
				}
				return b
			default:
			}
		}
		select {
		case <-timeout:
			t.Fatalf("held request %s never reached a backend", id)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// holdOn sends a request the backend holds and returns the backend that got
// it, and a function that releases it and waits for the client's response.
func (s *stack) holdOn(t testing.TB, id string, body []byte) (*backend, func()) {
	t.Helper()
	type result struct {
		rec received
		err error
	}
	done := make(chan result, 1)
	go func() {
		resp, err := s.send(context.Background(), body, id, nil)
		if err != nil {
			done <- result{err: err}
			return
		}
		defer resp.Body.Close()
		var rec received
		err = json.NewDecoder(resp.Body).Decode(&rec)
		done <- result{rec, err}
	}()
	got := s.arrival(t, id)
	return got, func() {
		got.release(id)
		if r := <-done; r.err != nil {
			t.Fatalf("held request %s: %v", id, r.err)
		}
	}
}

// openAIError decodes an OpenAI-shaped error response.
func openAIError(t testing.TB, resp *http.Response) (code, message string) {
	t.Helper()
	b, _ := io.ReadAll(resp.Body)
	if ct := resp.Header.Get("content-type"); !strings.HasPrefix(ct, "application/json") {
		t.Fatalf("status %d error with content-type %q: %s", resp.StatusCode, ct, b)
	}
	var v struct {
		Error struct{ Message, Type, Code string }
	}
	if err := json.Unmarshal(b, &v); err != nil || v.Error.Message == "" || v.Error.Type == "" || v.Error.Code == "" {
		t.Fatalf("status %d error body is not OpenAI-shaped (%v): %s", resp.StatusCode, err, b)
	}
	return v.Error.Code, v.Error.Message
}

func execOutput(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}
