package admin

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/tokenlb/tokenlb/cost"
	"github.com/tokenlb/tokenlb/picker"
)

func TestHandler(t *testing.T) {
	p, err := picker.New([]string{"127.0.0.1:8001", "127.0.0.1:8002"}, picker.Options{})
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(p.Collector())
	var ready atomic.Bool
	ready.Store(true)
	srv := httptest.NewServer(Handler(p, cost.New(cost.Options{}), reg, ready.Load, Options{}))
	defer srv.Close()

	get := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}

	l, _ := p.Pick(picker.Request{Cost: picker.Tokens(1234)})
	code, body := get("/debug/hosts")
	var v struct{ Hosts []picker.HostLoad }
	if err := json.Unmarshal([]byte(body), &v); code != 200 || err != nil {
		t.Fatalf("/debug/hosts %d %v: %s", code, err, body)
	}
	var tokens, reqs int64
	for _, h := range v.Hosts {
		tokens += h.InFlightTokens
		reqs += h.InFlightRequests
	}
	if len(v.Hosts) != 2 || tokens != 1234 || reqs != 1 {
		t.Fatalf("/debug/hosts = %s", body)
	}
	if code, body := get("/metrics"); code != 200 || !strings.Contains(body, `tokenlb_host_in_flight_tokens{host="`+l.Host()+`"} 1234`) {
		t.Fatalf("/metrics %d:\n%s", code, body)
	}
	if code, _ := get("/healthz"); code != 200 {
		t.Fatalf("/healthz %d", code)
	}
	if code, _ := get("/readyz"); code != 200 {
		t.Fatalf("/readyz %d while ready", code)
	}
	ready.Store(false)
	if code, _ := get("/readyz"); code != 503 {
		t.Fatalf("/readyz %d while shutting down", code)
	}
	if code, _ := get("/healthz"); code != 200 {
		t.Fatalf("/healthz %d while shutting down", code)
	}
}

// TestServerTimeouts: the admin server closes a connection whose client
// stalls in its headers, and an idle keep-alive one; the defaults set
// every timeout.
func TestServerTimeouts(t *testing.T) {
	d := DefaultTimeouts()
	for name, v := range map[string]time.Duration{"header": d.Header, "read": d.Read, "write": d.Write, "idle": d.Idle} {
		if v <= 0 {
			t.Errorf("default %s timeout %v", name, v)
		}
	}
	short, long := 200*time.Millisecond, time.Hour
	for _, tc := range []struct {
		name     string
		timeouts Timeouts
		send     string
	}{
		{"stalled headers", Timeouts{Header: short, Read: long, Write: long, Idle: long}, "GET / HTTP/1.1\r\nHost: a\r\n"},
		{"idle keep-alive", Timeouts{Header: long, Read: long, Write: long, Idle: short}, "GET / HTTP/1.1\r\nHost: a\r\n\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			srv := NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }), tc.timeouts)
			go srv.Serve(l)
			defer srv.Close()
			conn, err := net.Dial("tcp", l.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if _, err := io.WriteString(conn, tc.send); err != nil {
				t.Fatal(err)
			}
			// The server ends the connection: a read returns io.EOF long
			// before this deadline, which only guards against a hang.
			conn.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.Copy(io.Discard, conn); err != nil {
				t.Fatalf("connection not closed by the server: %v", err)
			}
		})
	}
}

// TestPprof: /debug/pprof/ is not served unless Options.Pprof says so, and
// then serves the index and profiles in pprof's format (gzipped protocol
// buffers), through the admin server with its timeouts.
func TestPprof(t *testing.T) {
	p, err := picker.New([]string{"127.0.0.1:8001"}, picker.Options{})
	if err != nil {
		t.Fatal(err)
	}
	serve := func(opts Options) string {
		srv := httptest.NewUnstartedServer(nil)
		srv.Config = NewServer(Handler(p, cost.New(cost.Options{}), prometheus.NewRegistry(), func() bool { return true }, opts), DefaultTimeouts())
		srv.Start()
		t.Cleanup(srv.Close)
		return srv.URL
	}
	get := func(url string) (int, []byte) {
		t.Helper()
		resp, err := http.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, b
	}
	// isProfile reports whether b is a gzipped profile.proto: well-formed
	// protocol buffer fields, sample_type (1, length-delimited) among them.
	isProfile := func(b []byte) bool {
		zr, err := gzip.NewReader(bytes.NewReader(b))
		if err != nil {
			return false
		}
		raw, err := io.ReadAll(zr)
		if err != nil {
			return false
		}
		sampleType := false
		for len(raw) > 0 {
			num, typ, n := protowire.ConsumeField(raw)
			if n < 0 {
				return false
			}
			sampleType = sampleType || num == 1 && typ == protowire.BytesType
			raw = raw[n:]
		}
		return sampleType
	}

	off := serve(Options{})
	for _, path := range []string{"/debug/pprof/", "/debug/pprof/heap", "/debug/pprof/profile?seconds=1", "/debug/pprof/cmdline", "/debug/pprof/trace"} {
		if code, _ := get(off + path); code != http.StatusNotFound {
			t.Errorf("pprof off: %s answered %d, want 404", path, code)
		}
	}
	if code, _ := get(off + "/healthz"); code != 200 {
		t.Errorf("pprof off: /healthz %d", code)
	}

	on := serve(Options{Pprof: true})
	if code, b := get(on + "/debug/pprof/"); code != 200 || !strings.Contains(string(b), "goroutine") {
		t.Fatalf("pprof on: index %d:\n%s", code, b)
	}
	if code, b := get(on + "/debug/pprof/heap"); code != 200 || !isProfile(b) {
		t.Errorf("pprof on: heap profile %d, %d bytes, not a profile", code, len(b))
	}
	if code, b := get(on + "/debug/pprof/profile?seconds=1"); code != 200 || !isProfile(b) {
		t.Errorf("pprof on: CPU profile %d, %d bytes, not a profile: %.200q", code, len(b), b)
	}
	if code, b := get(on + "/debug/pprof/cmdline"); code != 200 || len(b) == 0 {
		t.Errorf("pprof on: cmdline %d %q", code, b)
	}
	if code, _ := get(on + "/metrics"); code != 200 {
		t.Errorf("pprof on: /metrics %d", code)
	}
}
