package main

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	grpcstatus "google.golang.org/grpc/status"

	"github.com/tokenlb/tokenlb/internal/testdns"
	"github.com/tokenlb/tokenlb/route"
)

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

var binary string // built once by TestMain

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "tokenlb-test")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "tokenlb")
	if out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput(); err != nil {
		panic(string(out))
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// startTokenlb starts the tokenlb binary on free loopback ports; exited
// receives its exit status once.
func startTokenlb(t *testing.T, extraYAML string) (cmd *exec.Cmd, grpcAddr, adminAddr string, exited <-chan error) {
	t.Helper()
	dir := t.TempDir()
	grpcAddr, adminAddr = freeAddr(t), freeAddr(t)
	cfg := filepath.Join(dir, "tokenlb.yaml")
	yaml := "listen: " + grpcAddr + "\nadmin: " + adminAddr + "\nhosts: [{address: 127.0.0.1:8001}, {address: 127.0.0.1:8002}]\n" + extraYAML
	if err := os.WriteFile(cfg, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd, exited = runTokenlb(t, cfg, adminAddr)
	return cmd, grpcAddr, adminAddr, exited
}

// runTokenlb starts the tokenlb binary on the configuration file at path
// and waits until it is ready; exited receives its exit status once. It is
// killed at the end of the test.
func runTokenlb(t *testing.T, path, adminAddr string) (*exec.Cmd, <-chan error) {
	t.Helper()
	cmd := exec.Command(binary, "--config", path)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exitc, done := make(chan error, 1), make(chan struct{})
	go func() { exitc <- cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
	})
	waitFor(t, func() bool { return status(adminAddr, "/readyz") == 200 })
	return cmd, exitc
}

// finish delivers a held stream's response headers (end of stream), reads
// the reply and ends the stream.
func finish(t *testing.T, stream extprocv3.ExternalProcessor_ProcessClient) {
	t.Helper()
	err := stream.Send(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{
		ResponseHeaders: &extprocv3.HttpHeaders{EndOfStream: true}}})
	if err == nil {
		_, err = stream.Recv()
	}
	if err != nil {
		t.Fatalf("completing a held request: %v", err)
	}
	stream.CloseSend()
}

// waitFor polls cond until it holds, failing the test after 10 s.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached in 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func status(adminAddr, path string) int {
	resp, err := http.Get("http://" + adminAddr + path)
	if err != nil {
		return 0
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

func get(t *testing.T, adminAddr, path string) string {
	t.Helper()
	resp, err := http.Get("http://" + adminAddr + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// holdStream opens an ext_proc stream for a GET and leaves it in flight.
func holdStream(t *testing.T, conn *grpc.ClientConn) extprocv3.ExternalProcessor_ProcessClient {
	t.Helper()
	stream, err := extprocv3.NewExternalProcessorClient(conn).Process(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	err = stream.Send(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestHeaders{
		RequestHeaders: &extprocv3.HttpHeaders{EndOfStream: true, Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
			{Key: ":method", RawValue: []byte("GET")}, {Key: ":path", RawValue: []byte("/v1/models")}}}}}})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil || resp.GetRequestHeaders() == nil {
		t.Fatalf("headers reply %v, %v", resp, err)
	}
	return stream
}

func TestGracefulShutdownDrains(t *testing.T) {
	cmd, grpcAddr, adminAddr, exited := startTokenlb(t, "drain_timeout: 60s\nshutdown_delay: 3s\n")
	conn, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	health := healthpb.NewHealthClient(conn)
	// The health names: Envoy's (the ext_proc service), and the Endpoint
	// Picker Protocol's liveness and readiness.
	healthOf := func(name string) healthpb.HealthCheckResponse_ServingStatus {
		t.Helper()
		hr, err := health.Check(context.Background(), &healthpb.HealthCheckRequest{Service: name})
		if err != nil {
			t.Fatalf("health of %q: %v", name, err)
		}
		return hr.GetStatus()
	}
	for _, name := range []string{"envoy.service.ext_proc.v3.ExternalProcessor", "liveness", "readiness", ""} {
		if got := healthOf(name); got != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("health of %q once ready: %v", name, got)
		}
	}
	stream := holdStream(t, conn)
	if !strings.Contains(get(t, adminAddr, "/debug/hosts"), `"in_flight_requests": 1`) {
		t.Fatalf("held request not in /debug/hosts: %s", get(t, adminAddr, "/debug/hosts"))
	}

	cmd.Process.Signal(syscall.SIGTERM)
	// Within shutdown_delay: not ready, health NOT_SERVING, streams still accepted.
	waitFor(t, func() bool { return status(adminAddr, "/readyz") == 503 })
	for _, name := range []string{"envoy.service.ext_proc.v3.ExternalProcessor", "readiness", ""} {
		if got := healthOf(name); got != healthpb.HealthCheckResponse_NOT_SERVING {
			t.Fatalf("health of %q while draining: %v", name, got)
		}
	}
	if got := healthOf("liveness"); got != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("liveness while draining: %v", got)
	}
	select {
	case err := <-exited:
		t.Fatalf("exited (%v) with a stream in flight", err)
	default:
	}
	// The held request completes: the process then exits 0.
	finish(t, stream)
	if err := <-exited; err != nil {
		t.Fatalf("exit after drain: %v", err)
	}
}

// TestDrainServesNewStreams: while tokenlb drains (after shutdown_delay)
// it still routes new requests; it exits once no routing stream is open.
func TestDrainServesNewStreams(t *testing.T) {
	cmd, grpcAddr, adminAddr, exited := startTokenlb(t, "drain_timeout: 60s\nshutdown_delay: 0s\n")
	conn, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	first := holdStream(t, conn)
	cmd.Process.Signal(syscall.SIGTERM)
	waitFor(t, func() bool { return status(adminAddr, "/readyz") == 503 })
	// Draining, with no delay: a new request is still routed.
	second := holdStream(t, conn)
	for i, stream := range []extprocv3.ExternalProcessor_ProcessClient{first, second} {
		// Waiting a while is the only way to see that it does not exit.
		select {
		case err := <-exited:
			t.Fatalf("exited (%v) with %d routing streams open", err, 2-i)
		case <-time.After(100 * time.Millisecond):
		}
		finish(t, stream)
	}
	if err := <-exited; err != nil {
		t.Fatalf("exit after drain: %v", err)
	}
}

// TestDrainRefusesAtTheEnd: with a request still being routed halfway
// through drain_timeout, new streams are refused (Unavailable) and the open
// one still completes; the process then exits without waiting out the rest.
func TestDrainRefusesAtTheEnd(t *testing.T) {
	cmd, grpcAddr, _, exited := startTokenlb(t, "drain_timeout: 20s\nshutdown_delay: 0s\n")
	conn, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	held := holdStream(t, conn)
	cmd.Process.Signal(syscall.SIGTERM)
	// New streams are served for the first 10 s, then refused.
	start := time.Now()
	deadline := start.Add(15 * time.Second)
	for {
		stream, err := extprocv3.NewExternalProcessorClient(conn).Process(context.Background())
		if err == nil {
			// A refused stream may end before this goes out (io.EOF):
			// its status comes with Recv either way.
			stream.Send(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestHeaders{
				RequestHeaders: &extprocv3.HttpHeaders{EndOfStream: true, Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
					{Key: ":method", RawValue: []byte("GET")}, {Key: ":path", RawValue: []byte("/v1/models")}}}}}})
			_, err = stream.Recv()
		}
		if grpcstatus.Code(err) == codes.Unavailable {
			if waited := time.Since(start); waited < 9*time.Second {
				t.Fatalf("new streams refused after %v of a 20 s drain, before its second half", waited)
			}
			break
		}
		if err != nil {
			t.Fatalf("a stream while draining: %v", err)
		}
		stream.CloseSend() // served: the stream ends
		if time.Now().After(deadline) {
			t.Fatal("new streams still served 15 s into a 20 s drain")
		}
		time.Sleep(100 * time.Millisecond) // polling for the drain's second half
	}
	finish(t, held) // the request in flight after new ones were refused
	if err := <-exited; err != nil {
		t.Fatalf("exit after drain: %v", err)
	}
}

func TestDrainTimeout(t *testing.T) {
	cmd, grpcAddr, _, exited := startTokenlb(t, "drain_timeout: 100ms\n")
	conn, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	holdStream(t, conn) // never completes
	cmd.Process.Signal(syscall.SIGTERM)
	if err := <-exited; err != nil {
		t.Fatalf("exit after drain timeout: %v", err)
	}
}

func TestBadConfigExits2(t *testing.T) {
	out, err := exec.Command(binary, "--hosts", "10.0.0.1:80,10.0.0.1:80").CombinedOutput()
	ee, ok := err.(*exec.ExitError)
	if !ok || ee.ExitCode() != 2 || !strings.Contains(string(out), "hosts[1].address") {
		t.Fatalf("err %v, output %s", err, out)
	}
}

// TestReloadHosts: the hosts follow the configuration file when it changes
// and on SIGHUP, without a restart; a bad file keeps the running hosts and
// is counted.
func TestReloadHosts(t *testing.T) {
	dir := t.TempDir()
	grpcAddr, adminAddr := freeAddr(t), freeAddr(t)
	path := filepath.Join(dir, "tokenlb.yaml")
	// writeAt replaces the file at once with one of time at: written
	// beside it, given its time, then renamed over it, so that tokenlb
	// never sees the content with another time.
	writeAt := func(hosts string, at time.Time) {
		t.Helper()
		yaml := "listen: " + grpcAddr + "\nadmin: " + adminAddr + "\nhosts: [" + hosts + "]\n"
		tmp := path + ".new"
		if err := os.WriteFile(tmp, []byte(yaml), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(tmp, at, at); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	// Each write has a time of its own: the file's clock ticks coarsely,
	// and two writes of the same size within a tick look like one.
	stamp := time.Now()
	write := func(hosts string) {
		t.Helper()
		stamp = stamp.Add(time.Second)
		writeAt(hosts, stamp)
	}
	write("{address: 127.0.0.1:8001}, {address: 127.0.0.1:8002}")
	cmd, _ := runTokenlb(t, path, adminAddr)
	hosts := func() string { return get(t, adminAddr, "/debug/hosts") }

	if h := hosts(); strings.Count(h, `"source": "static"`) != 2 {
		t.Fatalf("hosts at start, each from the file: %s", h)
	}
	write("{address: 127.0.0.1:8002}, {address: 127.0.0.1:8003}")
	waitFor(t, func() bool {
		h := hosts()
		return strings.Contains(h, "127.0.0.1:8003") && !strings.Contains(h, "127.0.0.1:8001")
	})
	if h := hosts(); strings.Count(h, `"source": "static"`) != 2 {
		t.Fatalf("hosts after the change, each from the file: %s", h)
	}

	write("{address: 127.0.0.1:8002}, {address: 127.0.0.1:8002}") // a duplicate: refused
	waitFor(t, func() bool {
		return strings.Contains(get(t, adminAddr, "/metrics"), `tokenlb_discovery_errors_total{source="static"} 1`)
	})
	if h := hosts(); !strings.Contains(h, "127.0.0.1:8003") {
		t.Fatalf("a bad file changed the hosts: %s", h)
	}

	// A change the file's size and time do not show: SIGHUP reads it.
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	writeAt("{address: 127.0.0.1:8004}, {address: 127.0.0.1:8003}", fi.ModTime())
	cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, func() bool {
		h := hosts()
		return strings.Contains(h, "127.0.0.1:8004") && !strings.Contains(h, "127.0.0.1:8002")
	})
}

// TestDNSHosts: with discovery.source dns, tokenlb starts on the name's
// addresses and follows its answers; an answer with no address keeps the
// running hosts and is counted.
func TestDNSHosts(t *testing.T) {
	z := &testdns.Zone{}
	z.Set("127.0.0.11", "127.0.0.12")
	server, stop, err := z.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	dir := t.TempDir()
	grpcAddr, adminAddr := freeAddr(t), freeAddr(t)
	path := filepath.Join(dir, "tokenlb.yaml")
	yaml := "listen: " + grpcAddr + "\nadmin: " + adminAddr + "\ndiscovery: {source: dns, dns: {name: vllm.test:8000, interval: 100ms, server: " +
		server + "}}\n"
	if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	runTokenlb(t, path, adminAddr)
	hosts := func() string { return get(t, adminAddr, "/debug/hosts") }
	if h := hosts(); !strings.Contains(h, "127.0.0.11:8000") || !strings.Contains(h, "127.0.0.12:8000") ||
		!strings.Contains(h, `"source": "dns vllm.test:8000"`) {
		t.Fatalf("hosts at start: %s", h)
	}
	z.Set("127.0.0.12", "127.0.0.13")
	waitFor(t, func() bool {
		h := hosts()
		return strings.Contains(h, "127.0.0.13:8000") && !strings.Contains(h, "127.0.0.11:8000")
	})
	z.Set([]string{}...)
	waitFor(t, func() bool {
		return strings.Contains(get(t, adminAddr, "/metrics"), `tokenlb_discovery_errors_total{source="dns"}`)
	})
	if h := hosts(); !strings.Contains(h, "127.0.0.13:8000") {
		t.Fatalf("an empty answer changed the hosts: %s", h)
	}
}

// TestSelfSignedTLS: with tls.self_signed the ext_proc listener speaks
// TLS only, and a gateway that skips verifying the certificate (as
// gateways do with an Endpoint Picker's default certificate) gets its
// health answers.
func TestSelfSignedTLS(t *testing.T) {
	_, grpcAddr, _, _ := startTokenlb(t, "tls: {self_signed: true}\n")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, tc := range []struct {
		name  string
		creds credentials.TransportCredentials
		ok    bool
	}{
		{"TLS, unverified", credentials.NewTLS(&tls.Config{InsecureSkipVerify: true}), true},
		{"plaintext", insecure.NewCredentials(), false},
	} {
		conn, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(tc.creds))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: "readiness"})
		if tc.ok && (err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING) {
			t.Fatalf("%s: readiness %v, %v; want SERVING", tc.name, resp, err)
		}
		if !tc.ok && err == nil {
			t.Fatalf("%s: answered (%v); want the connection refused", tc.name, resp)
		}
	}
}

// TestMetricsLint: the metrics tokenlb serves pass Prometheus' own lint
// (units in seconds and bytes, counters ending in _total, help on every
// metric), say which build runs, and have a series for every rejection
// reason from the start, so that an alert on a rate of them has data.
func TestMetricsLint(t *testing.T) {
	_, _, adminAddr, _ := startTokenlb(t, "")
	text := get(t, adminAddr, "/metrics")
	problems, err := promlint.New(strings.NewReader(text)).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("%s: %s", p.Metric, p.Text)
	}
	for _, want := range []string{"tokenlb_build_info{", "tokenlb_host_load_seconds{", `tokenlb_rejections_total{reason="no_capacity"} 0`,
		`tokenlb_rejections_total{reason="body_too_large"} 0`, `tokenlb_observer_claims_total{result="none",role="observer"} 0`,
		`tokenlb_host_ejections_total{host="127.0.0.1:8001",reason="connect_failure"} 0`} {
		if !strings.Contains(text, want) {
			t.Errorf("no %s in /metrics", want)
		}
	}
	for _, r := range route.Reasons {
		if !strings.Contains(text, `tokenlb_rejections_total{reason="`+r+`"}`) {
			t.Errorf("no series for rejection reason %s", r)
		}
	}
	for _, gone := range []string{"tokenlb_picks_unknown_model_total", "tokenlb_picks_rejected_total", "_microseconds"} {
		if strings.Contains(text, gone) {
			t.Errorf("%s is still served", gone)
		}
	}
}
