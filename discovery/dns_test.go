package discovery

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/tokenlb/tokenlb/internal/testdns"
)

// startZone serves z on loopback until the test ends.
func startZone(t *testing.T, z *testdns.Zone) string {
	t.Helper()
	addr, stop, err := z.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	return addr
}

func addresses(eps []Endpoint) []string {
	var out []string
	for _, e := range eps {
		out = append(out, e.Address)
	}
	return out
}

// TestDNS: the name's records, IPv4 and IPv6, become the hosts with the
// port; a change of the answer is reported; a failed or empty answer is
// counted and keeps the running set.
func TestDNS(t *testing.T) {
	z := &testdns.Zone{}
	z.Set("10.0.0.2", "10.0.0.1", "fd00::1")
	errs := prometheus.NewCounter(prometheus.CounterOpts{Name: "errors_total"})
	d := &DNS{Name: "vllm.llm.svc.cluster.local:8000", Server: startZone(t, z), Interval: 10 * time.Millisecond, Errors: errs}

	eps, err := d.Resolve(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if got, want := addresses(eps), []string{"10.0.0.1:8000", "10.0.0.2:8000", "[fd00::1]:8000"}; !slices.Equal(got, want) {
		t.Fatalf("resolved %v, want %v", got, want)
	}

	updates := make(chan []Endpoint, 10)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go d.Run(ctx, eps, func(e []Endpoint) { updates <- e })

	z.Set([]string{}...) // no address: counted, the set stays
	waitCount(t, errs, 1)
	z.Set("10.0.0.3")
	select {
	case got := <-updates:
		if !slices.Equal(addresses(got), []string{"10.0.0.3:8000"}) {
			t.Fatalf("reported %v", addresses(got))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a changed answer was not reported")
	}
	z.Set(nil...) // NXDOMAIN
	before := testutil.ToFloat64(errs)
	waitCount(t, errs, before+1)
	if len(updates) != 0 {
		t.Fatalf("a failed answer was reported: %v", addresses(<-updates))
	}
}

// waitCount polls c until it reaches n: the source reports errors only
// through it.
func waitCount(t *testing.T, c prometheus.Counter, n float64) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); testutil.ToFloat64(c) < n; {
		if time.Now().After(deadline) {
			t.Fatalf("counter at %v, want %v", testutil.ToFloat64(c), n)
		}
		time.Sleep(time.Millisecond)
	}
}
