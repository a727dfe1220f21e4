package processor_test

import (
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/tokenlb/tokenlb/backend"
	"github.com/tokenlb/tokenlb/picker"
	"github.com/tokenlb/tokenlb/processor"
)

// Envoy 1.40's response flags (response.flags, a bit vector): UF, it could
// not connect; UC, the upstream connection was closed under the request.
const (
	flagUF = 0x20
	flagUC = 0x40
)

// flagged returns response headers as Envoy sends them to an ext_proc filter
// whose response_attributes list response.flags: the attributes under key
// (Envoy's is envoy.filters.http.ext_proc), flags < 0 for none.
func flagged(headers map[string]string, key string, flags float64, eos bool) *extprocv3.ProcessingRequest {
	var hs []*corev3.HeaderValue
	for k, v := range headers {
		hs = append(hs, &corev3.HeaderValue{Key: k, RawValue: []byte(v)})
	}
	r := &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{
		ResponseHeaders: &extprocv3.HttpHeaders{Headers: &corev3.HeaderMap{Headers: hs}, EndOfStream: eos}}}
	if flags >= 0 {
		r.Attributes = map[string]*structpb.Struct{key: {Fields: map[string]*structpb.Value{
			processor.ResponseFlagsAttribute: structpb.NewNumberValue(flags)}}}
	}
	return r
}

type statusReport struct {
	host   string
	status int
}

func drain(reports chan statusReport) []statusReport {
	var got []statusReport
	for {
		select {
		case r := <-reports:
			got = append(got, r)
		default:
			return got
		}
	}
}

// TestConnectFailureReported: a response Envoy flags UF (its own 503: it
// could not connect to the host) is reported to passive ejection as
// backend.ConnectFailure, once, for the host tokenlb chose; nothing else
// is, whatever the response's headers say, since only Envoy sets the flags.
func TestConnectFailureReported(t *testing.T) {
	const key = "envoy.filters.http.ext_proc"
	for _, tc := range []struct {
		name    string
		headers map[string]string
		key     string
		flags   float64
		want    int
	}{
		{"connect failure", map[string]string{":status": "503"}, key, flagUF, backend.ConnectFailure},
		{"connect failure among other flags", map[string]string{":status": "503"}, key, flagUF | 0x1 | 0x1000, backend.ConnectFailure},
		{"attributes under another filter name", map[string]string{":status": "503"}, "tokenlb.observer", flagUF, backend.ConnectFailure},
		{"backend's own 503", map[string]string{":status": "503"}, key, 0, 503},
		{"connection closed by the backend (UC)", map[string]string{":status": "503"}, key, flagUC, 503},
		{"no attributes", map[string]string{":status": "503"}, key, -1, 503},
		{"a backend's headers claim a connect failure", map[string]string{":status": "503",
			"x-envoy-response-flags": "UF", processor.ResponseFlagsAttribute: "32"}, key, 0, 503},
		{"retried elsewhere: the flags are the last attempt's", map[string]string{":status": "503",
			"x-envoy-attempt-count": "2"}, key, flagUF, 503},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reports := make(chan statusReport, 10)
			env := startEnv(t, threeHosts, picker.Options{}, Config{ResponseStatus: func(h string, s int) { reports <- statusReport{h, s} }})
			f := env.open(t, buffered)
			host := routed(t, f, post(chat(10))).headers[processor.DefaultDestinationHeader]
			step(t, f, flagged(tc.headers, tc.key, tc.flags, true))
			f.close()
			env.waitEnded(t, 1)
			if got := drain(reports); len(got) != 1 || got[0] != (statusReport{host, tc.want}) {
				t.Fatalf("reported %v, want [{%s %d}]", got, host, tc.want)
			}
		})
	}
}

// TestConnectFailureOnEitherStream: the routing and observer streams both
// show the response headers, in either order; a connect failure is reported
// whichever carries the flags, even when the other already reported the 503.
func TestConnectFailureOnEitherStream(t *testing.T) {
	const key = "envoy.filters.http.ext_proc"
	status503 := map[string]string{":status": "503", "content-type": "application/json"}
	for _, tc := range []struct {
		name                  string
		observerFirst         bool
		routingFlags, obFlags float64
		want                  []int
	}{
		{"observer first, both flagged", true, flagUF, flagUF, []int{backend.ConnectFailure}},
		{"routing first, both flagged", false, flagUF, flagUF, []int{backend.ConnectFailure}},
		{"routing first, only the observer flagged", false, -1, flagUF, []int{503, backend.ConnectFailure}},
		{"observer first, only the routing stream flagged", true, flagUF, -1, []int{503, backend.ConnectFailure}},
		{"neither flagged", false, -1, -1, []int{503}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reports := make(chan statusReport, 10)
			env := startEnv(t, threeHosts, picker.Options{}, Config{Observer: true,
				ResponseStatus: func(h string, s int) { reports <- statusReport{h, s} }})
			f := env.open(t, buffered)
			out := routed(t, f, post(chat(10)))
			host := out.headers[processor.DefaultDestinationHeader]
			o := env.openObserver(t)
			o.send(observerHeaders(out.headers[processor.DefaultLeaseHeader]))
			eventually(t, "the observer's claim", func() bool { return env.counter(t, "tokenlb_observer_claims_total", "observer/claimed") == 1 })
			routing := func() { step(t, f, flagged(status503, key, tc.routingFlags, false)) }
			observer := func(n int) {
				o.send(flagged(status503, key, tc.obFlags, false))
				eventually(t, "the observer's report", func() bool { return len(reports) >= n })
			}
			if tc.observerFirst {
				observer(1)
				routing()
			} else {
				routing()
				observer(len(tc.want))
			}
			o.send(respBody(`{"error":{}}`, true))
			eventually(t, "the release", func() bool { return env.ledger() == ledgerSum{} })
			time.Sleep(10 * time.Millisecond) // a late report would show now
			got := drain(reports)
			if len(got) != len(tc.want) {
				t.Fatalf("reported %v, want statuses %v for %s", got, tc.want, host)
			}
			for i, r := range got {
				if r != (statusReport{host, tc.want[i]}) {
					t.Fatalf("reported %v, want statuses %v for %s", got, tc.want, host)
				}
			}
		})
	}
}
