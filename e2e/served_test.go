package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/tokenlb/tokenlb/internal/envoycfg"
)

// TestServedElsewhereThroughEnvoy: Envoy 1.40 reports, on the response
// path, that another endpoint than the one tokenlb chose served the request
// (the Endpoint Picker Protocol's x-gateway-destination-endpoint-served in
// the envoy.lb metadata), and tokenlb's charge follows it there.
//
// It is the realistic case, not a gateway played by a script: the
// override-host configuration, tokenlb's chosen host down, and Envoy
// retrying the request on the next host of tokenlb's envoy.lb list (its
// fallback hosts). What Envoy reports is the host it actually used:
// envoycfg's ReportServed renders a header_mutation filter that writes
// %UPSTREAM_HOST% (the last attempt's host) into a response header and a
// header_to_metadata filter that moves it into envoy.lb, both after
// tokenlb's ext_proc filters in the chain, so that they run before them on
// the response path, and has those filters forward envoy.lb (Envoy 1.40
// delivers it to both: the routing filter's response_headers and the
// observer's, in observability mode, each carry it in metadata_context). A
// Lua filter setting the metadata would only play a gateway that claims some
// host; this way the report comes from Envoy's own load balancing.
//
// tokenlb is made to choose the dead host by loading the two others first
// with held requests and stopping the one left idle; its own health checks
// are off, so it does not know the host is down (as when a host dies
// between two checks). The request that follows is an SSE stream the
// serving backend holds open: while it runs, /debug/hosts must show its
// charge on the host that serves it and nothing on the dead one.
func TestServedElsewhereThroughEnvoy(t *testing.T) {
	s := startStack(t, envoyOpts{config: "envoy-override-host.yaml",
		// No prefix affinity: the loading requests share their prompt and
		// must spread. No active health checks and no passive ejection:
		// tokenlb keeps choosing the dead host.
		tokenlb: []string{"--prefix-max-extra-load=0", "--health-check-interval=0", "--consecutive-5xx=0"},
		Options: envoycfg.Options{ReportServed: true}})

	// Two long held requests load two hosts; the third host stays idle.
	loaded := map[string]bool{}
	var releases []func()
	for i := range 2 {
		b, release := s.holdOn(t, fmt.Sprintf("load%d", i), chatBody(2000, false))
		if loaded[b.addr] {
			t.Fatalf("both loading requests went to %s", b.addr)
		}
		loaded[b.addr] = true
		releases = append(releases, release)
	}
	var dead *backend
	for _, b := range s.backends {
		if !loaded[b.addr] {
			dead = b
		}
	}
	before := map[string]hostLoad{}
	for _, h := range s.tokenlb.hostLoads() {
		before[h.Address] = h
	}
	if h := before[dead.addr]; h.InFlightRequests != 0 || h.Picks != 0 {
		t.Fatalf("the idle host %s before: %+v", dead.addr, h)
	}
	dead.stop()

	// The least-loaded host is the dead one: tokenlb chooses it, Envoy
	// cannot connect and retries on a fallback host, which serves it.
	resp, err := s.send(context.Background(), chatBody(50, true), "sse", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("status %d: %s", resp.StatusCode, b)
	}
	served := s.arrival(t, "sse")
	r := bufio.NewReader(resp.Body)
	if first, err := r.ReadString('\n'); err != nil || !strings.Contains(first, served.addr) {
		t.Fatalf("first event %q, %v", first, err)
	}
	if h := s.tokenlb.host(dead.addr); h.Picks != 1 {
		t.Fatalf("tokenlb picked the dead host %d times, want 1: the test proves nothing (%+v)", h.Picks, h)
	}
	if n := s.envoy.stat(t, "cluster.llm_backends.upstream_rq_retry"); n == 0 {
		t.Fatal("Envoy did not retry the request")
	}
	if v := resp.Header.Get("x-tokenlb-e2e-served"); v != "" {
		t.Errorf("the served report leaked to the client as a header: %q", v)
	}

	// While the stream runs, its charge is on the host that serves it. The
	// observer releases the prefill part at the first event, so compare
	// request counts, and tokens only on the dead host.
	deadline := time.Now().Add(5 * time.Second)
	for {
		d, sv := s.tokenlb.host(dead.addr), s.tokenlb.host(served.addr)
		if d.InFlightRequests == 0 && d.InFlightTokens == 0 &&
			sv.InFlightRequests == before[served.addr].InFlightRequests+1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the charge did not follow the served endpoint: chosen (dead) host %s has %d requests, %d tokens in flight, want 0; "+
				"serving host %s has %d requests in flight, want %d",
				dead.addr, d.InFlightRequests, d.InFlightTokens,
				served.addr, sv.InFlightRequests, before[served.addr].InFlightRequests+1)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := s.tokenlb.metric("tokenlb_requests_served_elsewhere_total"); got != 1 {
		t.Fatalf("tokenlb_requests_served_elsewhere_total = %v, want 1", got)
	}

	served.release("sse")
	rest, _ := io.ReadAll(r)
	if !strings.Contains(string(rest), "data: [DONE]") {
		t.Fatalf("stream ended without [DONE]: %q", rest)
	}
	for _, release := range releases {
		release()
	}
	s.tokenlb.waitIdle()
	// The loading requests were reported served where tokenlb chose: no
	// move for them.
	if got := s.tokenlb.metric("tokenlb_requests_served_elsewhere_total"); got != 1 {
		t.Fatalf("tokenlb_requests_served_elsewhere_total = %v after all ended, want 1", got)
	}
}
