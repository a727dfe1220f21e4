package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestKilledBackendFailsOneRequest: behind deploy/envoy.yaml, a backend that
// dies (its port refuses connections) costs the one request that finds it
// dead, not consecutive_5xx of them. Envoy answers that request with its own
// 503 flagged UF; the ext_proc filters send tokenlb the flag
// (response_attributes: [response.flags]) with the response headers, and
// tokenlb ejects the host at once, before Envoy passes the 503 on. Without
// that, the dead host fails fast, looks idle, and takes the next requests
// until three 503s in a row eject it (bench/RESULTS.md, "Churn").
//
// Active health checks are off, so that only the passive rules can take the
// host out; the requests are sequential, so that none is in flight on the
// host when it dies. The host killed is the one that served the last request:
// prefix affinity sends the next identical request there.
func TestKilledBackendFailsOneRequest(t *testing.T) {
	s := startStack(t, envoyOpts{config: "envoy.yaml", tokenlb: passiveOnly()})
	var last string
	for i := range 6 {
		status, served := s.try(t, "")
		if status != 200 {
			t.Fatalf("warm-up request %d: status %d", i, status)
		}
		last = served
	}
	dead := s.byAddr[last]
	cxActive := func() int { return s.envoy.hostStat(t, "llm_backends", dead.addr, "cx_active") }
	if n := cxActive(); n < 1 {
		t.Fatalf("Envoy's /clusters shows %d active connections to %s, want its pooled one", n, dead.addr)
	}
	dead.stop()
	// Wait for Envoy to see its pooled connections to the host close, as it
	// does at once when a process dies: a request sent on one before that
	// would be reset (UC), not refused.
	waitFor(t, 5*time.Second, "Envoy's connections to the dead host closed", func() bool { return cxActive() == 0 })

	var failed []int
	for i := range 30 {
		status, served := s.try(t, "")
		if status != 200 {
			failed = append(failed, i)
			continue
		}
		if served == dead.addr {
			t.Fatalf("request %d was served by the dead backend", i)
		}
	}
	if len(failed) > 1 {
		t.Fatalf("%d requests failed after the kill (requests %v), want at most 1: the first 503 Envoy flags UF must eject the host",
			len(failed), failed)
	}
	if len(failed) == 0 {
		t.Fatal("no request failed: tokenlb never chose the dead backend, so the test proves nothing")
	}
	if n := s.envoy.stat(t, "cluster.llm_backends.upstream_cx_connect_fail"); n != 1 {
		t.Fatalf("Envoy counted %d connect failures, want 1", n)
	}
	h := s.tokenlb.host(dead.addr)
	if !h.Health.Down || !strings.Contains(h.Health.Reason, "could not connect") {
		t.Fatalf("/debug/hosts shows the dead host as %+v", h.Health)
	}
	if got := s.tokenlb.metric(fmt.Sprintf(`tokenlb_host_ejections_total{host=%q,reason="connect_failure"}`, dead.addr)); got != 1 {
		t.Fatalf(`tokenlb_host_ejections_total{reason="connect_failure"} = %v, want 1`, got)
	}
	if got := s.tokenlb.metric(fmt.Sprintf(`tokenlb_host_ejections_total{host=%q,reason="responses"}`, dead.addr)); got != 0 {
		t.Fatalf(`tokenlb_host_ejections_total{reason="responses"} = %v, want 0`, got)
	}
	s.tokenlb.waitIdle()
}
