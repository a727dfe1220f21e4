package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"
)

// try sends a chat request and returns its status and, when it succeeded,
// the backend that served it.
func (s *stack) try(t *testing.T, model string) (status int, served string) {
	t.Helper()
	body := chatBody(10, false)
	if model != "" {
		body = []byte(strings.Replace(string(body), `"model":"m"`, fmt.Sprintf(`"model":%q`, model), 1))
	}
	resp, err := s.send(context.Background(), body, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode == 200 {
		var rec received
		if err := json.Unmarshal(b, &rec); err != nil {
			t.Fatalf("backend answer %q: %v", b, err)
		}
		return 200, rec.Backend
	}
	return resp.StatusCode, ""
}

// longEjection is tokenlb's flags for an ejection that outlasts the test,
// so that a slow machine cannot see the host readmitted before the test
// looks.
func longEjection() []string { return []string{"--base-ejection-time=10m", "--max-ejection-time=10m"} }

// passiveOnly is tokenlb's flags for the tests of passive ejection: no
// active health checks, and a long ejection.
func passiveOnly() []string { return append([]string{"--health-check-interval=0"}, longEjection()...) }

// TestEjection: a backend that dies, or answers every request with a 500 at
// once, is ejected after a bounded number of failed requests, and no request
// goes to it afterwards; active checks eject a dead backend before any
// request fails and readmit it when it is back.
func TestEjection(t *testing.T) {
	for _, tc := range []struct {
		name  string
		flags []string
		fail  func(b *backend) // how the first backend fails
		// The most requests that fail, the reason label and a word of
		// /debug/hosts' reason: one connect failure Envoy flags UF
		// ejects a dead host; three 5xx in a row a failing one.
		most           int
		reason, health string
	}{
		{"dead/passive", passiveOnly(), func(b *backend) { b.srv.Close() }, 1, "connect_failure", "could not connect"},
		{"fast-failing/passive", passiveOnly(), func(b *backend) { b.fail.Store(500) }, 3, "responses", "5xx"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startStack(t, envoyOpts{config: "envoy.yaml", tokenlb: tc.flags})
			bad := s.backends[0]
			tc.fail(bad)
			failed, last := 0, -1
			for i := range 40 {
				status, served := s.try(t, "")
				if status != 200 {
					failed++
					last = i
					continue
				}
				if served == bad.addr {
					t.Fatalf("request %d was served by the failing backend", i)
				}
			}
			// The ejection lasts longer than any machine takes for the 40
			// requests (longEjection).
			if failed == 0 || failed > tc.most {
				t.Fatalf("%d requests failed (the last was request %d), want 1 to %d before the ejection", failed, last, tc.most)
			}
			h := s.tokenlb.host(bad.addr)
			if !h.Health.Down || !strings.Contains(h.Health.Reason, tc.health) {
				t.Fatalf("/debug/hosts shows the failing host as %+v", h.Health)
			}
			if got := s.tokenlb.metric(fmt.Sprintf(`tokenlb_host_ejections_total{host=%q,reason=%q}`, bad.addr, tc.reason)); got != 1 {
				t.Fatalf("tokenlb_host_ejections_total{reason=%q} = %v, want 1", tc.reason, got)
			}
			s.tokenlb.waitIdle()
		})
	}

	t.Run("dead/active", func(t *testing.T) {
		s := startStack(t, envoyOpts{config: "envoy.yaml", tokenlb: []string{"--consecutive-5xx=0",
			"--health-check-interval=50ms", "--unhealthy-threshold=1", "--healthy-threshold=2"}})
		bad := s.backends[0]
		bad.srv.Close()
		waitFor(t, 5*time.Second, "the dead host ejected", func() bool { return s.tokenlb.host(bad.addr).Health.Down })
		if r := s.tokenlb.host(bad.addr).Health.Reason; !strings.Contains(r, "health check") {
			t.Fatalf("reason %q", r)
		}
		for i := range 30 {
			if status, served := s.try(t, ""); status != 200 || served == bad.addr {
				t.Fatalf("request %d after the ejection: status %d, served by %s", i, status, served)
			}
		}
		// Back on the same address: readmitted, and served again.
		l, err := net.Listen("tcp", bad.addr)
		if err != nil {
			t.Skipf("cannot listen on %s again: %v", bad.addr, err)
		}
		srv := &http.Server{Handler: http.HandlerFunc(bad.serve)}
		go srv.Serve(l)
		t.Cleanup(func() { srv.Close() })
		waitFor(t, 5*time.Second, "the host readmitted", func() bool { return !s.tokenlb.host(bad.addr).Health.Down })
		served := false
		for range 60 {
			if status, by := s.try(t, ""); status == 200 && by == bad.addr {
				served = true
				break
			}
		}
		if !served {
			t.Fatal("the readmitted host got none of 60 requests")
		}
		s.tokenlb.waitIdle()
	})
}

// TestModelRouting: requests go only to the hosts that list their model in
// GET /v1/models, and a model no host serves gets an OpenAI-shaped 404.
func TestModelRouting(t *testing.T) {
	s := &stack{byAddr: map[string]*backend{}}
	var addrs []string
	for _, models := range [][]string{{"llama"}, {"llama", "m"}, {"qwen"}} {
		b := startBackend(t, models...)
		s.backends = append(s.backends, b)
		s.byAddr[b.addr] = b
		addrs = append(addrs, b.addr)
	}
	s.tokenlb = startTokenlb(t, addrs, "--model-discovery-interval=50ms")
	o := envoyOpts{config: "envoy.yaml"}
	o.TokenlbPort, o.Backends = s.tokenlb.grpcPort, addrs
	s.envoy = startEnvoy(t, o)
	waitFor(t, 5*time.Second, "every host's models discovered", func() bool {
		for _, h := range s.tokenlb.hostLoads() {
			if h.Models == nil {
				return false
			}
		}
		return true
	})
	for _, tc := range []struct {
		model string
		want  []string
	}{
		{"qwen", []string{addrs[2]}},
		{"llama", []string{addrs[0], addrs[1]}},
		{"m", []string{addrs[1]}},
	} {
		seen := map[string]bool{}
		for i := range 20 {
			status, served := s.try(t, tc.model)
			if status != 200 || !slices.Contains(tc.want, served) {
				t.Fatalf("model %s, request %d: status %d, served by %s; want one of %v", tc.model, i, status, served, tc.want)
			}
			seen[served] = true
		}
		if len(seen) != len(tc.want) {
			t.Errorf("model %s went to %v, want all of %v", tc.model, seen, tc.want)
		}
	}
	resp, err := s.send(context.Background(), []byte(`{"model":"gpt-nope","messages":[{"role":"user","content":"hi"}]}`), "", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 404 {
		t.Fatalf("unknown model: status %d, want 404", resp.StatusCode)
	}
	if code, msg := openAIError(t, resp); code != "model_not_found" || !strings.Contains(msg, "gpt-nope") {
		t.Fatalf("unknown model: error %q, %q", code, msg)
	}
	if n := s.backends[2].requests.Load(); n != 20 {
		t.Errorf("the qwen backend served %d requests, want the 20 for qwen", n)
	}
	s.tokenlb.waitIdle()

	// The list of models through Envoy is every host's, each once, whoever
	// is asked (routed to one host, it would be that host's alone).
	for i := range 5 {
		resp, err := http.Get(s.envoy.url("/v1/models"))
		if err != nil {
			t.Fatal(err)
		}
		var list struct {
			Object string
			Data   []struct{ ID string }
		}
		err = json.NewDecoder(resp.Body).Decode(&list)
		resp.Body.Close()
		var ids []string
		for _, m := range list.Data {
			ids = append(ids, m.ID)
		}
		if err != nil || resp.StatusCode != 200 || list.Object != "list" || !slices.Equal(ids, []string{"llama", "m", "qwen"}) {
			t.Fatalf("GET /v1/models %d: status %d, models %v (%v), want [llama m qwen]", i, resp.StatusCode, ids, err)
		}
	}
}
