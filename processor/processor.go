// Package processor is tokenlb's Envoy external-processing (ext_proc) server.
//
// Envoy opens one Process stream per HTTP request. The server reads the
// request body, counts its prompt tokens, picks the least token-loaded host
// and tells Envoy where to send the request: it sets the destination header
// (x-gateway-destination-endpoint by default) and the same key in the
// "envoy.lb" dynamic metadata namespace, as the Endpoint Picker Protocol does.
// The charge's prefill part is released at the response's first token and
// the rest at its end, or everything when the stream ends first (client abort,
// upstream reset, timeout). The response is seen either on the same stream
// (response body STREAMED) or by a second ext_proc filter in observability
// mode, which opens its own stream and finds the request by a correlation
// header.
//
// Two request body modes are supported: BUFFERED, where Envoy sends the whole
// body in one message and holds the headers until the body reply, and
// FULL_DUPLEX_STREAMED, where Envoy drains the body and forwards only what the
// server streams back. proto-notes.md documents the message order.
package processor

import (
	"context"
	"crypto/rand"
	"errors"
	"io"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/tokenlb/tokenlb/cost"
	"github.com/tokenlb/tokenlb/picker"
	"github.com/tokenlb/tokenlb/tokenizer"
)

// Defaults for Config fields left empty.
const (
	DefaultDestinationHeader = "x-gateway-destination-endpoint"
	DefaultMetadataNamespace = "envoy.lb"
	DefaultMaxBodyBytes      = 8 << 20
	DefaultRetryAfter        = time.Second
	DefaultLeaseHeader       = "x-tokenlb-lease"
	DefaultObserverGrace     = 2 * time.Second
	// ObserverMetadata is the gRPC initial metadata key that marks a stream
	// from the observability-mode filter; its value is "observer".
	ObserverMetadata = "x-tokenlb-role"
	// ChunkBytes is the largest body chunk streamed back in
	// FULL_DUPLEX_STREAMED mode; Envoy advises staying below 64 KiB.
	ChunkBytes = 62000
)

// Config configures a Server.
type Config struct {
	// DestinationHeader is the header Envoy's ORIGINAL_DST cluster or
	// override_host policy reads; it is also the key in MetadataNamespace.
	DestinationHeader string
	// MetadataNamespace is the dynamic metadata namespace of the destination.
	MetadataNamespace string
	// MaxBodyBytes is the largest request body accepted; larger gets 413.
	MaxBodyBytes int64
	// RetryAfter is sent with 503 when no host has capacity.
	RetryAfter time.Duration
	// Fallbacks is how many other hosts follow the chosen one in the
	// destination metadata, for a proxy to retry on.
	Fallbacks int
	// Cost prices requests per host and learns from responses; nil means
	// cost.New with zero options (prompt tokens held until the end).
	Cost *cost.Estimator
	// Observer says that an observability-mode ext_proc filter after this
	// one watches responses: routed requests get a LeaseHeader that lets
	// its stream take over following the response.
	Observer bool
	// LeaseHeader is the correlation header for the observer.
	LeaseHeader string
	// ObserverGrace is how long a routed request waits, after its
	// response headers, for an observer stream to claim it: the
	// observer's stream opens on its own and may be overtaken by the
	// response headers on the routing stream.
	ObserverGrace time.Duration
	// EstimateFirstToken releases the prefill part when the host should
	// have prefilled the request, by the cost model's speed, instead of
	// waiting to see the first token (for responses tokenlb never sees).
	EstimateFirstToken bool
	// ModelRouting sends each request only to hosts that serve its model
	// (picker.Request.Model), and answers 404 when none does.
	ModelRouting bool
	// ResponseStatus, when set, is told the status of each routed request's
	// response, from its response headers: passive health checks
	// (backend.Watcher.Observe) learn from it which hosts fail.
	ResponseStatus func(host string, status int)
	// Logger receives per-request debug logs and errors; nil discards them.
	Logger *slog.Logger
	// Metrics records request metrics; nil records nothing.
	Metrics *Metrics
}

// Server implements envoy.service.ext_proc.v3.ExternalProcessor.
type Server struct {
	extprocv3.UnimplementedExternalProcessorServer
	cfg    Config
	picker *picker.Picker
	tok    *tokenizer.Tokenizer
	cost   *cost.Estimator
	log    *slog.Logger
	m      *Metrics

	mu      sync.Mutex
	pending map[string]*tracker // routed requests an observer may claim, by lease id
}

// New returns a Server that routes with p and counts with tok.
func New(p *picker.Picker, tok *tokenizer.Tokenizer, cfg Config) *Server {
	if cfg.DestinationHeader == "" {
		cfg.DestinationHeader = DefaultDestinationHeader
	}
	cfg.DestinationHeader = strings.ToLower(cfg.DestinationHeader)
	if cfg.MetadataNamespace == "" {
		cfg.MetadataNamespace = DefaultMetadataNamespace
	}
	if cfg.MaxBodyBytes <= 0 {
		cfg.MaxBodyBytes = DefaultMaxBodyBytes
	}
	if cfg.LeaseHeader == "" {
		cfg.LeaseHeader = DefaultLeaseHeader
	}
	cfg.LeaseHeader = strings.ToLower(cfg.LeaseHeader)
	if cfg.ObserverGrace <= 0 {
		cfg.ObserverGrace = DefaultObserverGrace
	}
	if cfg.Cost == nil {
		cfg.Cost = cost.New(cost.Options{})
	}
	if cfg.RetryAfter <= 0 {
		cfg.RetryAfter = DefaultRetryAfter
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := cfg.Metrics
	if m == nil {
		m = NewMetrics()
	}
	return &Server{cfg: cfg, picker: p, tok: tok, cost: cfg.Cost, log: log, m: m, pending: make(map[string]*tracker)}
}

// Process serves one HTTP request's stream. It answers every message Envoy
// sends, never returns before Envoy ends the stream (a server that returns
// early makes Envoy skip the response phase) except after an immediate
// response, and releases the request's lease exactly once on the way out.
func (s *Server) Process(stream extprocv3.ExternalProcessor_ProcessServer) error {
	if md, _ := metadata.FromIncomingContext(stream.Context()); slices.Contains(md.Get(ObserverMetadata), "observer") {
		return s.observe(stream)
	}
	s.m.streams.Inc()
	defer s.m.streams.Dec()
	x := &exchange{s: s, stream: stream, reqMode: filterv3.ProcessingMode_BUFFERED, contentLength: -1}
	defer x.end()
	for {
		req, err := stream.Recv()
		if err != nil {
			if isStreamEnd(stream.Context(), err) {
				return nil
			}
			return err
		}
		if pc := req.GetProtocolConfig(); pc != nil {
			x.reqMode, x.respMode = pc.GetRequestBodyMode(), pc.GetResponseBodyMode()
		}
		done, err := x.handle(req)
		if err != nil {
			if isStreamEnd(stream.Context(), err) {
				return nil
			}
			s.log.Warn("ext_proc send failed", "path", x.path, "err", err)
			return err
		}
		if done {
			return nil
		}
	}
}

// isStreamEnd reports whether err is Envoy ending the stream, which it does
// with END_STREAM followed at once by a reset: either may surface.
func isStreamEnd(ctx context.Context, err error) bool {
	if errors.Is(err, io.EOF) || ctx.Err() != nil {
		return true
	}
	c := status.Code(err)
	return c == codes.Canceled || c == codes.DeadlineExceeded
}

// exchange is the state of one Process stream.
type exchange struct {
	s      *Server
	stream extprocv3.ExternalProcessor_ProcessServer

	reqMode, respMode filterv3.ProcessingMode_BodySendMode

	path, method, contentType, requestID string
	contentLength                        int64

	body     []byte // request body so far (FULL_DUPLEX_STREAMED)
	bodyDone bool   // the request has been routed or rejected
	t        *tracker
	handed   bool // an observer follows the response
}

// end runs when the stream ends: unless an observer took the response over,
// whatever the request still holds is released.
func (x *exchange) end() {
	if x.t != nil && !x.handed {
		x.s.forget(x.t)
		x.t.abort()
	}
}

// forget removes t from the requests an observer may claim.
func (s *Server) forget(t *tracker) {
	if t.id != "" {
		s.mu.Lock()
		delete(s.pending, t.id)
		s.mu.Unlock()
	}
}

// handle answers one message; done reports that the stream is finished.
func (x *exchange) handle(req *extprocv3.ProcessingRequest) (done bool, err error) {
	switch r := req.Request.(type) {
	case *extprocv3.ProcessingRequest_RequestHeaders:
		return x.requestHeaders(r.RequestHeaders)
	case *extprocv3.ProcessingRequest_RequestBody:
		return x.requestBody(r.RequestBody)
	case *extprocv3.ProcessingRequest_RequestTrailers:
		return x.requestTrailers()
	case *extprocv3.ProcessingRequest_ResponseHeaders:
		x.responseHeaders(r.ResponseHeaders)
		return false, x.stream.Send(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{
			ResponseHeaders: &extprocv3.HeadersResponse{}}})
	case *extprocv3.ProcessingRequest_ResponseBody:
		if x.t != nil && !x.handed {
			x.t.responseBody(r.ResponseBody.GetBody(), r.ResponseBody.GetEndOfStream())
		}
		return false, x.stream.Send(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{
			ResponseBody: x.echo(r.ResponseBody, x.respMode)}})
	case *extprocv3.ProcessingRequest_ResponseTrailers:
		if x.t != nil && !x.handed {
			x.t.finish(picker.ResponseEnd)
		}
		return false, x.stream.Send(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseTrailers{
			ResponseTrailers: &extprocv3.TrailersResponse{}}})
	}
	// An unknown message type from a newer Envoy: nothing to answer.
	return false, nil
}

// responseHeaders decides who follows the response. This stream does when it
// will see the rest (no body, or response body STREAMED). Otherwise an
// observer stream does, if one is configured: one that already claimed the
// request, or one that claims it within Config.ObserverGrace. With
// EstimateFirstToken and no observer, the charge is held until this stream
// ends (Envoy keeps it open to the end of the response when response
// trailers are SEND). Otherwise the headers are the last thing tokenlb
// sees, and everything is released now.
func (x *exchange) responseHeaders(h *extprocv3.HttpHeaders) {
	t, s := x.t, x.s
	if t == nil || x.handed {
		return
	}
	eos := h.GetEndOfStream()
	if !eos && x.respMode == filterv3.ProcessingMode_NONE && s.cfg.Observer {
		x.handed = true
		t.responseHeaders(h.GetHeaders(), false)
		if t.owner.Load() != ownerRouter {
			return // claimed already
		}
		time.AfterFunc(s.cfg.ObserverGrace, func() {
			if !t.owner.CompareAndSwap(ownerRouter, ownerKept) {
				return
			}
			s.forget(t)
			s.m.observerClaims.WithLabelValues("none").Inc()
			s.log.Warn("no observer stream claimed a routed request; is the observer filter configured?",
				"request_id", x.requestID, "grace", s.cfg.ObserverGrace)
			t.finish(picker.ResponseHeaders)
		})
		return
	}
	if !t.owner.CompareAndSwap(ownerRouter, ownerKept) {
		// An observer claimed it and sees the same response.
		x.handed = true
		return
	}
	s.forget(t)
	t.responseHeaders(h.GetHeaders(), eos)
	if !eos && x.respMode == filterv3.ProcessingMode_NONE && !s.cfg.EstimateFirstToken {
		t.finish(picker.ResponseHeaders)
	}
}

func (x *exchange) requestHeaders(h *extprocv3.HttpHeaders) (bool, error) {
	for _, hv := range h.GetHeaders().GetHeaders() {
		v := headerValue(hv)
		switch strings.ToLower(hv.GetKey()) {
		case ":path":
			x.path = v
		case ":method":
			x.method = v
		case "content-type":
			x.contentType = v
		case "content-length":
			if n, err := strconv.ParseInt(v, 10, 64); err == nil {
				x.contentLength = n
			}
		case "x-request-id":
			x.requestID = v
		}
	}
	switch x.reqMode {
	case filterv3.ProcessingMode_BUFFERED, filterv3.ProcessingMode_FULL_DUPLEX_STREAMED:
	default:
		if !h.GetEndOfStream() {
			return x.reject(errUnsupportedMode(x.reqMode))
		}
	}
	if x.contentLength > x.s.cfg.MaxBodyBytes {
		return x.reject(errTooLarge(x.s.cfg.MaxBodyBytes))
	}
	api := tokenizer.APIFor(x.path)
	if api != tokenizer.Other && !h.GetEndOfStream() && x.contentType != "" && !isJSON(x.contentType) {
		return x.reject(errMediaType(x.contentType))
	}
	if h.GetEndOfStream() {
		// No body: route now, in the headers reply. A POST to an API path
		// still needs a prompt (400); GET and DELETE there are routed.
		if api != tokenizer.Other && x.method == "POST" {
			return x.reject(errPrompt(tokenizer.ErrNoPrompt))
		}
		return x.routeZero()
	}
	if x.reqMode == filterv3.ProcessingMode_FULL_DUPLEX_STREAMED {
		// The headers reply waits for the whole body: it carries the route.
		return false, nil
	}
	// Envoy holds the headers for the body; the body reply sets the
	// destination. Remove a client-sent one now, so that no path (trailers
	// without a body, say) can forward it.
	return false, x.stream.Send(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{
		RequestHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{HeaderMutation: &extprocv3.HeaderMutation{
			RemoveHeaders: []string{x.s.cfg.DestinationHeader}}}}}})
}

func (x *exchange) requestBody(b *extprocv3.HttpBody) (bool, error) {
	if x.bodyDone {
		// A duplicate end of stream, or data after it: routed already.
		x.s.log.Debug("request body after end of stream ignored", "path", x.path, "request_id", x.requestID)
		return false, nil
	}
	if int64(len(x.body))+int64(len(b.GetBody())) > x.s.cfg.MaxBodyBytes {
		return x.reject(errTooLarge(x.s.cfg.MaxBodyBytes))
	}
	if x.reqMode != filterv3.ProcessingMode_FULL_DUPLEX_STREAMED {
		// BUFFERED: this one message is the whole body, whether or not
		// trailers follow.
		return x.route(b.GetBody(), inBody)
	}
	x.body = append(x.body, b.GetBody()...)
	if !b.GetEndOfStream() {
		return false, nil
	}
	return x.route(x.body, inDuplex)
}

func (x *exchange) requestTrailers() (bool, error) {
	switch {
	case x.bodyDone:
	case x.reqMode == filterv3.ProcessingMode_FULL_DUPLEX_STREAMED:
		// The trailers end the body.
		if done, err := x.route(x.body, inDuplex); done || err != nil {
			return done, err
		}
	default:
		// BUFFERED with trailers but no body: Envoy sends no body message,
		// and the headers can no longer be changed, so there is no way to
		// route the request.
		return x.reject(errNoBody())
	}
	return false, x.stream.Send(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestTrailers{
		RequestTrailers: &extprocv3.TrailersResponse{}}})
}

// replyIn says which reply carries the route.
type replyIn int

const (
	inHeaders replyIn = iota // no body: the headers reply
	inBody                   // BUFFERED: the body reply (Envoy still holds the headers)
	inDuplex                 // FULL_DUPLEX_STREAMED: the held headers reply, then the body echoed
)

// routeZero routes a request without a body at zero cost.
func (x *exchange) routeZero() (bool, error) {
	return x.pick(tokenizer.Prompt{API: tokenizer.APIFor(x.path)}, inHeaders, nil)
}

// route counts body, picks a host and sends the reply that carries the
// destination.
func (x *exchange) route(body []byte, in replyIn) (bool, error) {
	start := time.Now()
	prompt, err := x.s.tok.CountRequest(x.path, body)
	x.s.m.tokenizeSeconds.Observe(time.Since(start).Seconds())
	if err != nil {
		return x.reject(errPrompt(err))
	}
	return x.pick(prompt, in, body)
}

// pick charges a host for prompt and sends the reply that carries the
// destination.
func (x *exchange) pick(prompt tokenizer.Prompt, in replyIn, body []byte) (bool, error) {
	x.bodyDone = true
	s := x.s
	s.m.requestTokens.WithLabelValues(string(prompt.API)).Observe(float64(prompt.Tokens))
	start := time.Now()
	req := cost.Request{Model: prompt.Model, Route: string(prompt.API), PromptTokens: prompt.Tokens,
		MaxOutputTokens: prompt.MaxOutputTokens}
	output := s.cost.Output(req)
	pr := picker.Request{Cost: s.cost.Cost(req, output), Prefix: prompt.Prefix, PrefixBlockBytes: prompt.PrefixBlockBytes,
		PromptBytes: prompt.TextBytes}
	if s.cfg.ModelRouting {
		pr.Model = prompt.Model
	}
	lease, err := s.picker.Pick(pr)
	s.m.pickSeconds.Observe(time.Since(start).Seconds())
	switch {
	case errors.Is(err, picker.ErrUnknownModel):
		return x.reject(errUnknownModel(prompt.Model))
	case err != nil:
		return x.reject(errNoCapacity(s.cfg.RetryAfter))
	}
	x.t = newTracker(s, lease, req)
	s.m.outputTokens.Observe(float64(output))
	s.log.Debug("routed", "path", x.path, "request_id", x.requestID, "api", prompt.API, "model", prompt.Model,
		"tokens", prompt.Tokens, "expected_output", output, "host", lease.Host())

	set := []*corev3.HeaderValueOption{{
		Header:       &corev3.HeaderValue{Key: s.cfg.DestinationHeader, RawValue: []byte(lease.Host())},
		AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
	}}
	if s.cfg.Observer {
		x.t.id = rand.Text()
		s.mu.Lock()
		s.pending[x.t.id] = x.t
		s.mu.Unlock()
		set = append(set, &corev3.HeaderValueOption{
			Header:       &corev3.HeaderValue{Key: s.cfg.LeaseHeader, RawValue: []byte(x.t.id)},
			AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
		})
	}
	common := &extprocv3.CommonResponse{HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: set}}
	// The metadata carries the Endpoint Picker Protocol's ordered list: the
	// chosen host, then fallbacks that override_host tries on a retry. The
	// header stays a single address, as ORIGINAL_DST requires.
	md := destinationMetadata(s.cfg.MetadataNamespace, s.cfg.DestinationHeader,
		strings.Join(append([]string{lease.Host()}, lease.Fallbacks(s.cfg.Fallbacks)...), ","))

	if in == inBody {
		return false, x.stream.Send(&extprocv3.ProcessingResponse{DynamicMetadata: md,
			Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{Response: common}}})
	}
	err = x.stream.Send(&extprocv3.ProcessingResponse{DynamicMetadata: md,
		Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{Response: common}}})
	if err != nil || in == inHeaders {
		return false, err
	}
	return false, x.sendChunks(body)
}

// sendChunks streams body back to Envoy in FULL_DUPLEX_STREAMED mode, in
// chunks of at most ChunkBytes, the last one marked end of stream.
func (x *exchange) sendChunks(body []byte) error {
	for {
		n := min(len(body), ChunkBytes)
		last := n == len(body)
		err := x.stream.Send(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{
			RequestBody: streamed(body[:n], last)}})
		if err != nil || last {
			return err
		}
		body = body[n:]
	}
}

// echo answers a response body chunk: in FULL_DUPLEX_STREAMED mode by sending
// the bytes back, in the other modes by letting them through unchanged.
func (x *exchange) echo(b *extprocv3.HttpBody, mode filterv3.ProcessingMode_BodySendMode) *extprocv3.BodyResponse {
	if mode == filterv3.ProcessingMode_FULL_DUPLEX_STREAMED {
		return streamed(b.GetBody(), b.GetEndOfStream())
	}
	return &extprocv3.BodyResponse{}
}

func streamed(b []byte, eos bool) *extprocv3.BodyResponse {
	return &extprocv3.BodyResponse{Response: &extprocv3.CommonResponse{BodyMutation: &extprocv3.BodyMutation{
		Mutation: &extprocv3.BodyMutation_StreamedResponse{StreamedResponse: &extprocv3.StreamedBodyResponse{
			Body: b, EndOfStream: eos}}}}}
}

// reject answers the client directly and ends the exchange.
func (x *exchange) reject(e *apiError) (bool, error) {
	x.bodyDone = true
	x.s.m.rejections.WithLabelValues(e.reason).Inc()
	x.s.log.Debug("rejected", "path", x.path, "request_id", x.requestID, "status", e.status, "reason", e.reason, "message", e.message)
	err := x.stream.Send(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ImmediateResponse{
		ImmediateResponse: e.immediateResponse()}})
	if x.t != nil {
		x.t.finish(picker.ImmediateResponse)
	}
	return true, err
}

func destinationMetadata(namespace, key, host string) *structpb.Struct {
	return &structpb.Struct{Fields: map[string]*structpb.Value{
		namespace: structpb.NewStructValue(&structpb.Struct{Fields: map[string]*structpb.Value{
			key: structpb.NewStringValue(host),
		}}),
	}}
}

// headerValue returns a header's value; Envoy sends raw_value, older
// versions value.
func headerValue(h *corev3.HeaderValue) string {
	if rv := h.GetRawValue(); len(rv) > 0 {
		return string(rv)
	}
	return h.GetValue()
}

// isJSON reports whether a content type is JSON (application/json, any
// +json type, with or without parameters).
func isJSON(contentType string) bool {
	mt, _, _ := strings.Cut(contentType, ";")
	mt = strings.ToLower(strings.TrimSpace(mt))
	return mt == "application/json" || strings.HasSuffix(mt, "+json")
}

// GRPCServerOptions returns the gRPC server options a Server needs: a
// receive limit above maxBodyBytes, since Envoy sends a buffered body as one
// message and grpc-go refuses messages over 4 MiB by default.
func GRPCServerOptions(maxBodyBytes int64) []grpc.ServerOption {
	if maxBodyBytes <= 0 {
		maxBodyBytes = DefaultMaxBodyBytes
	}
	return []grpc.ServerOption{grpc.MaxRecvMsgSize(int(maxBodyBytes) + 1<<20)}
}
