package processor_test

// A scripted stand-in for Envoy's side of the ext_proc stream, for unit tests
// of protocol edge cases. It follows the message order Envoy 1.40 uses (see
// proto-notes.md) and applies header mutations with Envoy's rules; the e2e
// suite (package e2e) checks the same behaviours with a real Envoy.

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/tokenlb/tokenlb/cost"
	"github.com/tokenlb/tokenlb/picker"
	"github.com/tokenlb/tokenlb/processor"
	"github.com/tokenlb/tokenlb/route"
	"github.com/tokenlb/tokenlb/tokenizer"
)

// Config is what a test sets of the Server's and the Router's
// configuration; startEnv hands each its part.
type Config struct {
	// processor.Config
	DestinationHeader string
	MaxBodyBytes      int64
	Observer          bool
	ObserverGrace     time.Duration
	GraceTimer        func(f func()) // arms the grace timer instead of ObserverGrace's
	// route.Config
	Cost               *cost.Estimator
	Fallbacks          int
	EstimateFirstToken bool
	FollowInterval     time.Duration
	LogRequests        int
	Logger             *slog.Logger
	ModelRouting       bool
	ResponseStatus     func(host string, status int)
	DestinationList    bool
}

// testEnv is a tokenlb Server and Router on a loopback port with a client
// connected.
type testEnv struct {
	server       *processor.Server
	picker       *picker.Picker
	metrics      *processor.Metrics
	routeMetrics *route.Metrics
	client       extprocv3.ExternalProcessorClient
	// ended receives one value each time a Process call returns.
	ended chan struct{}
}

type trackedServer struct {
	*processor.Server
	ended chan struct{}
}

func (s trackedServer) Process(stream extprocv3.ExternalProcessor_ProcessServer) error {
	defer func() { s.ended <- struct{}{} }()
	return s.Server.Process(stream)
}

var sharedTokenizer *tokenizer.Tokenizer

func testTokenizer(t testing.TB) *tokenizer.Tokenizer {
	t.Helper()
	if sharedTokenizer == nil {
		tk, err := tokenizer.New(tokenizer.Options{})
		if err != nil {
			t.Fatal(err)
		}
		sharedTokenizer = tk
	}
	return sharedTokenizer
}

func startEnv(t testing.TB, hosts []string, popts picker.Options, cfg Config) *testEnv {
	t.Helper()
	p, err := picker.New(hosts, popts)
	if err != nil {
		t.Fatal(err)
	}
	routeMetrics := route.NewMetrics()
	router := route.New(route.Config{Picker: p, Tokenizer: testTokenizer(t), Cost: cfg.Cost, Fallbacks: cfg.Fallbacks,
		EstimateFirstToken: cfg.EstimateFirstToken, FollowInterval: cfg.FollowInterval, LogRequests: cfg.LogRequests, Logger: cfg.Logger, ModelRouting: cfg.ModelRouting, ResponseStatus: cfg.ResponseStatus,
		Metrics: routeMetrics})
	metrics := processor.NewMetrics()
	srv := processor.New(router, processor.Config{DestinationHeader: cfg.DestinationHeader, DestinationList: cfg.DestinationList, MaxBodyBytes: cfg.MaxBodyBytes,
		Observer: cfg.Observer, ObserverGrace: cfg.ObserverGrace, Metrics: metrics, Logger: cfg.Logger, LogRejections: cfg.LogRequests > 0})
	if cfg.GraceTimer != nil {
		srv.SetGraceTimer(cfg.GraceTimer)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(processor.GRPCServerOptions(cfg.MaxBodyBytes)...)
	ended := make(chan struct{}, 1<<14)
	extprocv3.RegisterExternalProcessorServer(gs, trackedServer{srv, ended})
	go gs.Serve(lis)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20), grpc.MaxCallSendMsgSize(64<<20)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		gs.Stop()
	})
	return &testEnv{server: srv, picker: p, metrics: metrics, routeMetrics: routeMetrics, client: extprocv3.NewExternalProcessorClient(conn), ended: ended}
}

// counter returns the value of the processor's or router's counter name
// with the label values given (joined by "/", in any order), or for a
// histogram its count.
func (e *testEnv) counter(t testing.TB, name, labels string) float64 {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(e.metrics.Collectors()...)
	reg.MustRegister(e.routeMetrics.Collectors()...)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			var values []string
			for _, l := range m.GetLabel() {
				values = append(values, l.GetValue())
			}
			var want []string
			if labels != "" {
				want = strings.Split(labels, "/")
			}
			slices.Sort(values)
			slices.Sort(want)
			if slices.Equal(values, want) {
				if h := m.GetHistogram(); h != nil {
					return float64(h.GetSampleCount())
				}
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

// headerValue returns a header's value, raw_value first, as Envoy reads it.
func headerValue(h *corev3.HeaderValue) string {
	if rv := h.GetRawValue(); len(rv) > 0 {
		return string(rv)
	}
	return h.GetValue()
}

// waitEnded waits until n Process calls have returned.
func (e *testEnv) waitEnded(t testing.TB, n int) {
	t.Helper()
	for range n {
		<-e.ended
	}
}

func (e *testEnv) inFlight() (tokens, requests int64) {
	for _, h := range e.picker.Hosts() {
		tokens += h.InFlightTokens
		requests += h.InFlightRequests
	}
	return
}

// httpRequest is what the downstream client sent.
type httpRequest struct {
	method, path string
	headers      map[string]string
	body         []byte
	// chunk splits the body into messages of this size in full-duplex mode;
	// 0 sends it in one message.
	chunk int
	// metadata goes with the headers, as Envoy forwards it
	// (metadata_options forwarding_namespaces).
	metadata *corev3.Metadata
}

// outcome is what Envoy would do after the request phase.
type outcome struct {
	headers   map[string]string // request headers after tokenlb's mutations
	metadata  map[string]string // dynamic metadata under envoy.lb
	immediate *extprocv3.ImmediateResponse
	body      []byte // the body forwarded upstream (echoed in full-duplex mode)
	chunks    int    // body messages tokenlb streamed back
}

// fakeEnvoy plays Envoy's side of one stream.
type fakeEnvoy struct {
	t      testing.TB
	mode   filterv3.ProcessingMode_BodySendMode
	stream extprocv3.ExternalProcessor_ProcessClient
	cancel context.CancelFunc
	// noProtocolConfig leaves protocol_config off the first message.
	noProtocolConfig bool
	// respMode is the response body mode announced (default NONE).
	respMode filterv3.ProcessingMode_BodySendMode
}

func (e *testEnv) open(t testing.TB, mode filterv3.ProcessingMode_BodySendMode) *fakeEnvoy {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := e.client.Process(ctx)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	return &fakeEnvoy{t: t, mode: mode, stream: stream, cancel: cancel}
}

func (f *fakeEnvoy) send(r *extprocv3.ProcessingRequest) error { return f.stream.Send(r) }

func (f *fakeEnvoy) sendHeaders(req httpRequest) error {
	hs := []*corev3.HeaderValue{
		{Key: ":method", RawValue: []byte(req.method)},
		{Key: ":path", RawValue: []byte(req.path)},
		{Key: ":authority", RawValue: []byte("llm.example")},
	}
	for k, v := range req.headers {
		hs = append(hs, &corev3.HeaderValue{Key: k, RawValue: []byte(v)})
	}
	msg := &extprocv3.ProcessingRequest{
		Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{
			Headers: &corev3.HeaderMap{Headers: hs}, EndOfStream: len(req.body) == 0}},
	}
	if !f.noProtocolConfig {
		msg.ProtocolConfig = &extprocv3.ProtocolConfiguration{RequestBodyMode: f.mode, ResponseBodyMode: f.respMode}
	}
	msg.MetadataContext = req.metadata
	return f.send(msg)
}

func (f *fakeEnvoy) sendBody(b []byte, eos bool) error {
	return f.send(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{
		RequestBody: &extprocv3.HttpBody{Body: b, EndOfStream: eos}}})
}

// do runs the request phase as Envoy does and returns what Envoy would
// forward upstream, or the immediate response.
func (f *fakeEnvoy) do(req httpRequest) (*outcome, error) {
	out := &outcome{headers: map[string]string{}, metadata: map[string]string{}}
	for k, v := range req.headers {
		out.headers[k] = v
	}
	if err := f.sendHeaders(req); err != nil {
		return nil, err
	}
	hasBody := len(req.body) > 0
	if f.mode == filterv3.ProcessingMode_FULL_DUPLEX_STREAMED && hasBody {
		// Envoy streams the body without waiting for the headers reply.
		chunk := req.chunk
		if chunk <= 0 {
			chunk = len(req.body)
		}
		for b := req.body; len(b) > 0; {
			n := min(chunk, len(b))
			if err := f.sendBody(b[:n], n == len(b)); err == io.EOF {
				// tokenlb answered (an immediate response) and ended the
				// stream while the body was still going out: stop sending
				// and read the answer, as Envoy does.
				break
			} else if err != nil {
				return nil, err
			}
			b = b[n:]
		}
	}
	resp, err := f.stream.Recv()
	if err != nil {
		return nil, err
	}
	if ir := resp.GetImmediateResponse(); ir != nil {
		out.immediate = ir
		return out, nil
	}
	hr := resp.GetRequestHeaders()
	if hr == nil {
		return nil, fmt.Errorf("first reply is %T, want request_headers", resp.Response)
	}
	apply(out, hr.GetResponse(), resp)
	if !hasBody {
		return out, nil
	}
	if f.mode == filterv3.ProcessingMode_FULL_DUPLEX_STREAMED {
		for {
			resp, err := f.stream.Recv()
			if err != nil {
				return nil, err
			}
			sr := resp.GetRequestBody().GetResponse().GetBodyMutation().GetStreamedResponse()
			if sr == nil {
				return nil, fmt.Errorf("full-duplex body reply %v has no streamed_response", resp)
			}
			if len(sr.GetBody()) > processor.ChunkBytes {
				return nil, fmt.Errorf("streamed chunk of %d bytes exceeds %d", len(sr.GetBody()), processor.ChunkBytes)
			}
			out.body = append(out.body, sr.GetBody()...)
			out.chunks++
			if sr.GetEndOfStream() {
				return out, nil
			}
		}
	}
	// BUFFERED: Envoy sends the whole body once the headers reply arrived.
	if err := f.sendBody(req.body, true); err != nil {
		return nil, err
	}
	resp, err = f.stream.Recv()
	if err != nil {
		return nil, err
	}
	if ir := resp.GetImmediateResponse(); ir != nil {
		out.immediate = ir
		return out, nil
	}
	br := resp.GetRequestBody()
	if br == nil {
		return nil, fmt.Errorf("body reply is %T, want request_body", resp.Response)
	}
	apply(out, br.GetResponse(), resp)
	out.body = req.body
	return out, nil
}

// apply performs a header mutation the way Envoy's default mutation rules
// do: pseudo-headers, host and x-envoy-* are not settable; a value is added
// to an existing header unless append_action says to overwrite. out.headers
// keeps the first value, the one ORIGINAL_DST reads.
func apply(out *outcome, c *extprocv3.CommonResponse, resp *extprocv3.ProcessingResponse) {
	for _, k := range c.GetHeaderMutation().GetRemoveHeaders() {
		delete(out.headers, strings.ToLower(k))
	}
	for _, o := range c.GetHeaderMutation().GetSetHeaders() {
		k := strings.ToLower(o.GetHeader().GetKey())
		if strings.HasPrefix(k, ":") || k == "host" || strings.HasPrefix(k, "x-envoy-") {
			continue
		}
		_, exists := out.headers[k]
		switch o.GetAppendAction() {
		case corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD:
			out.headers[k] = headerValue(o.GetHeader())
		case corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD, corev3.HeaderValueOption_ADD_IF_ABSENT:
			if !exists {
				out.headers[k] = headerValue(o.GetHeader())
			}
		case corev3.HeaderValueOption_OVERWRITE_IF_EXISTS:
			if exists {
				out.headers[k] = headerValue(o.GetHeader())
			}
		}
	}
	for ns, v := range resp.GetDynamicMetadata().GetFields() {
		if ns != processor.DefaultMetadataNamespace {
			continue
		}
		for k, s := range v.GetStructValue().GetFields() {
			out.metadata[k] = s.GetStringValue()
		}
	}
}

// respond delivers the upstream's response headers, as Envoy does once the
// backend answers, and checks tokenlb's reply.
func (f *fakeEnvoy) respond(status string) error {
	err := f.send(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{
		ResponseHeaders: &extprocv3.HttpHeaders{Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
			{Key: ":status", RawValue: []byte(status)}}}, EndOfStream: true}}})
	if err != nil {
		return err
	}
	resp, err := f.stream.Recv()
	if err != nil {
		return err
	}
	if resp.GetResponseHeaders() == nil {
		return fmt.Errorf("response_headers reply is %T", resp.Response)
	}
	return nil
}

// close ends the stream as Envoy does after the last phase: END_STREAM and
// an immediate reset.
func (f *fakeEnvoy) close() {
	f.stream.CloseSend()
	f.cancel()
}

// abort resets the stream without END_STREAM, as when the client goes away.
func (f *fakeEnvoy) abort() { f.cancel() }
