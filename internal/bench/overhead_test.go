package bench

import (
	"context"
	"math"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"
)

// Envoy 1.40's /stats lines for the two ext_proc filters of
// deploy/envoy.yaml, as a floor run showed them, and others around.
const envoyStats = `cluster.tokenlb.upstream_rq_total: 900
http.llm.ext_proc.tokenlb.server_half_closed: 18
http.llm.ext_proc.tokenlb.stream_msgs_received: 1334
http.llm.ext_proc.tokenlb.stream_msgs_sent: 1334
http.llm.ext_proc.tokenlb.streams_closed: 444
http.llm.ext_proc.tokenlb.streams_started: 445
http.llm.ext_proc.tokenlb_observer.stream_msgs_received: 0
http.llm.ext_proc.tokenlb_observer.stream_msgs_sent: 1897
http.llm.ext_proc.tokenlb_observer.streams_started: 445
http.llm.downstream_rq_total: 445
`

func TestSumExtProcMessages(t *testing.T) {
	n, err := sumExtProcMessages(strings.NewReader(envoyStats))
	if err != nil {
		t.Fatal(err)
	}
	if n != 1334+1334+1897 {
		t.Errorf("got %d messages, want %d", n, 1334+1334+1897)
	}
	if n, err := sumExtProcMessages(strings.NewReader("cluster.x.upstream_rq_total: 3\n")); err != nil || n != 0 {
		t.Errorf("no ext_proc stats: got %d, %v; want 0", n, err)
	}
	if _, err := sumExtProcMessages(strings.NewReader("http.llm.ext_proc.x.stream_msgs_sent: many\n")); err == nil {
		t.Error("a counter that is not a number: no error")
	}
}

func TestMedianSamples(t *testing.T) {
	sample := func(p50, p99, envoy, server, msgs float64, errs int) OverheadSample {
		s := OverheadSample{EnvoyCPU: envoy, ServerCPU: server, Messages: msgs, Errors: errs}
		s.E2E.P50, s.E2E.P99 = p50, p99
		return s
	}
	rounds := map[string]map[string][]OverheadSample{"floor": {"sse-200": {
		sample(3, 30, 1.0, 0.5, 210, 0),
		sample(1, 10, 3.0, 0.1, 208, 1),
		sample(2, 20, 2.0, 0.3, 209, 2),
	}}}
	got := medianSamples(rounds)["floor"]["sse-200"]
	want := sample(2, 20, 2.0, 0.3, 209, 3)
	if *got != want {
		t.Errorf("medians: got %+v, want %+v (each number's median; errors summed)", *got, want)
	}
}

func TestOverheadRatios(t *testing.T) {
	s := func(p50, envoy, server float64) *OverheadSample {
		o := &OverheadSample{EnvoyCPU: envoy, ServerCPU: server}
		o.E2E.P50 = p50
		return o
	}
	r := &OverheadReport{Arms: map[string]map[string]*OverheadSample{
		"envoy":   {"non-streamed": s(1.0, 0.8, 0), "sse-200": s(5, 1.5, 0)},
		"floor":   {"non-streamed": s(2.0, 1.2, 0.4), "sse-200": s(8, 3, 2)},
		"tokenlb": {"non-streamed": s(2.5, 1.3, 0.6), "sse-200": s(9, 3.3, 0.9)},
	}}
	got := r.Ratios()
	want := OverheadRatios{ServerCPU: 1.5, AddedP50: 1.5, SSEServerCPU: 1.5, SSEEnvoyCPU: 2.2}
	for _, c := range []struct {
		name      string
		got, want float64
	}{{"server CPU", got.ServerCPU, want.ServerCPU}, {"added p50", got.AddedP50, want.AddedP50},
		{"SSE server CPU", got.SSEServerCPU, want.SSEServerCPU}, {"SSE Envoy CPU", got.SSEEnvoyCPU, want.SSEEnvoyCPU}} {
		if math.Abs(c.got-c.want) > 1e-9 {
			t.Errorf("%s: got %v, want %v", c.name, c.got, c.want)
		}
	}
	if q := (&OverheadReport{}).Ratios(); q != (OverheadRatios{}) {
		t.Errorf("no arms: got %+v, want zeros", q)
	}
}

// TestFloorServer runs the floor's ext_proc service over an in-memory
// connection: the routing stream gets the destination header in round
// robin and empty replies otherwise, and ends after the response headers;
// the observer stream gets nothing.
func TestFloorServer(t *testing.T) {
	l := bufconn.Listen(1 << 20)
	srv := newFloorServer([]string{"10.0.0.1:8000", "10.0.0.2:8000"})
	go srv.Serve(l)
	defer srv.Stop()
	conn, err := grpc.NewClient("passthrough:///floor", grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return l.DialContext(ctx) }))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := extprocv3.NewExternalProcessorClient(conn)
	ctx := context.Background()

	for i, want := range []string{"10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.1:8000"} {
		s, err := client.Process(ctx)
		if err != nil {
			t.Fatal(err)
		}
		s.Send(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{}}})
		resp, err := s.Recv()
		if err != nil {
			t.Fatal(err)
		}
		set := resp.GetRequestHeaders().GetResponse().GetHeaderMutation().GetSetHeaders()
		if len(set) != 1 || set[0].GetHeader().GetKey() != destinationHeader || string(set[0].GetHeader().GetRawValue()) != want {
			t.Fatalf("request %d: request headers reply sets %v, want %s: %s", i, set, destinationHeader, want)
		}
		s.Send(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: []byte("{}"), EndOfStream: true}}})
		if resp, err := s.Recv(); err != nil || resp.GetRequestBody() == nil || resp.GetRequestBody().GetResponse() != nil {
			t.Fatalf("request %d: body reply %v, %v; want an empty BodyResponse", i, resp, err)
		}
		s.Send(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{ResponseHeaders: &extprocv3.HttpHeaders{}}})
		if resp, err := s.Recv(); err != nil || resp.GetResponseHeaders() == nil {
			t.Fatalf("request %d: response headers reply %v, %v", i, resp, err)
		}
		if _, err := s.Recv(); err == nil {
			t.Fatalf("request %d: the stream goes on after the response headers", i)
		}
	}

	// The observer: messages in observability mode get no answer.
	s, err := client.Process(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		s.Send(&extprocv3.ProcessingRequest{ObservabilityMode: true,
			Request: &extprocv3.ProcessingRequest_ResponseBody{ResponseBody: &extprocv3.HttpBody{Body: []byte("data: {}\n\n")}}})
	}
	s.CloseSend()
	if resp, err := s.Recv(); err == nil {
		t.Fatalf("observer stream answered: %v", resp)
	}
}

func TestCommandLine(t *testing.T) {
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	got := commandLine([]string{"./bin/tokenlb-bench", "--envoy", "/opt/somewhere/envoy", "--out", filepath.Join(wd, "out"), "--overhead"})
	if want := "./bin/tokenlb-bench --envoy envoy --out out --overhead"; got != want {
		t.Fatalf("commandLine = %q, want %q", got, want)
	}
}
