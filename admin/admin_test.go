package admin

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

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
