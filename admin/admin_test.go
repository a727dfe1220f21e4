package admin

import (
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
	srv := httptest.NewServer(Handler(p, cost.New(cost.Options{}), reg, ready.Load))
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
