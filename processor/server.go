// Package processor is tokenlb's Envoy external-processing (ext_proc)
// server: the protocol and nothing else.
//
// Envoy opens one Process stream per HTTP request. The Server reads the
// request's headers and body in the order Envoy sends them (BUFFERED or
// FULL_DUPLEX_STREAMED request bodies), asks a Router where the request goes
// and tells Envoy: it sets the destination header
// (x-gateway-destination-endpoint by default) and the same key in the
// "envoy.lb" dynamic metadata namespace, as the Endpoint Picker Protocol
// does, or answers the client itself (an ImmediateResponse). It then shows
// the Router's Flight what it sees of the response: on the same stream
// (response body STREAMED), or on the stream of a second ext_proc filter in
// observability mode, which finds the request by a correlation header. What
// a request costs, which host takes it and what is learned from its
// response are the Router's business (package route).
//
// proto-notes.md documents the message order.
package processor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"runtime"
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
)

// Defaults for Config fields left empty.
const (
	DefaultDestinationHeader = "x-gateway-destination-endpoint"
	DefaultMetadataNamespace = "envoy.lb"
	DefaultMaxBodyBytes      = 8 << 20
	DefaultLeaseHeader       = "x-tokenlb-lease"
	DefaultObserverGrace     = 2 * time.Second
	// ObserverMetadata is the gRPC initial metadata key that marks a stream
	// from one of the observability-mode filters: its value is "observer"
	// (shown the response) or "end" (shown the request headers; its close
	// is the request's end).
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
	// DestinationList sets the header to the metadata's whole list (the
	// chosen host, then the Flight's other destinations), as the Endpoint
	// Picker Protocol has it; false sets the chosen host alone, which is
	// what ORIGINAL_DST reads.
	DestinationList bool
	// MetadataNamespace is the dynamic metadata namespace of the destination.
	MetadataNamespace string
	// MaxBodyBytes is the largest request body accepted; larger gets 413.
	MaxBodyBytes int64
	// Observer says that an observability-mode ext_proc filter after this
	// one watches responses: routed requests get a LeaseHeader that lets
	// its stream take over following the response.
	Observer bool
	// LogRejections logs each answer tokenlb gives itself (a rejection)
	// at info, with its reason; false logs them at debug.
	LogRejections bool
	// LeaseHeader is the correlation header for the observer.
	LeaseHeader string
	// ObserverGrace is how long a routed request waits, after its
	// response headers, for an observer stream to claim it: the
	// observer's stream opens on its own and may be overtaken by the
	// response headers on the routing stream.
	ObserverGrace time.Duration
	// Logger receives per-request debug logs and errors; nil discards them.
	Logger *slog.Logger
	// Metrics records stream metrics; nil records into metrics nobody
	// registered.
	Metrics *Metrics
}

// Server implements envoy.service.ext_proc.v3.ExternalProcessor.
type Server struct {
	extprocv3.UnimplementedExternalProcessorServer
	cfg    Config
	router Router
	log    *slog.Logger
	m      *Metrics

	mu       sync.Mutex
	pending  map[string]*claimable // routed requests an observer may claim, by lease id
	routing  int                   // routing streams open
	idle     chan struct{}         // closed when routing falls to 0
	refusing bool                  // new routing streams are refused (see Refuse)

	// afterGrace runs f once ObserverGrace has passed (time.AfterFunc; a
	// test's own timer in export_test.go).
	afterGrace func(f func())
}

// New returns a Server that asks router where each request goes.
func New(router Router, cfg Config) *Server {
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
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := cfg.Metrics
	if m == nil {
		m = NewMetrics()
	}
	grace := cfg.ObserverGrace
	return &Server{cfg: cfg, router: router, log: log, m: m, pending: make(map[string]*claimable),
		afterGrace: func(f func()) { time.AfterFunc(grace, f) }}
}

// Process serves one HTTP request's stream. It answers every message Envoy
// sends and returns when Envoy ends the stream, after an immediate
// response, or once nothing more is needed from the stream: after the
// response headers of a request whose response an observer stream follows
// and Envoy does not send this stream (response body NONE).
// Returning ends the stream with an OK status, after which Envoy sends the
// rest of the request's life past this filter; so a response already
// flowing never depends on this process staying up. On the way out it ends
// the request's Flight unless an observer stream follows it.
func (s *Server) Process(stream extprocv3.ExternalProcessor_ProcessServer) error {
	md, _ := metadata.FromIncomingContext(stream.Context())
	switch role := md.Get(ObserverMetadata); {
	case slices.Contains(role, "observer"):
		return s.observe(stream)
	case slices.Contains(role, "end"):
		return s.watchEnd(stream)
	}
	if !s.routingStarted() {
		return status.Error(codes.Unavailable, "tokenlb is shutting down")
	}
	defer s.routingEnded()
	s.m.streams.Inc()
	defer s.m.streams.Dec()
	rs := &routingStream{s: s, grpc: stream, reqMode: filterv3.ProcessingMode_BUFFERED}
	defer rs.end()
	for {
		req, err := stream.Recv()
		if err != nil {
			return recvErr(stream.Context(), err)
		}
		if pc := req.GetProtocolConfig(); pc != nil {
			rs.reqMode, rs.respMode = pc.GetRequestBodyMode(), pc.GetResponseBodyMode()
		}
		if sub, ok := subsetHint(req.GetMetadataContext()); ok && !rs.decided {
			rs.req.Subset = sub
		}
		done, err := rs.handle(req)
		if err != nil {
			if isStreamEnd(stream.Context(), err) {
				return nil
			}
			s.log.Warn("ext_proc send failed", "path", rs.req.Path, "err", err)
			return err
		}
		if done {
			return nil
		}
	}
}

// routingStarted counts a routing stream in, unless new ones are refused.
func (s *Server) routingStarted() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.refusing {
		return false
	}
	if s.routing == 0 {
		s.idle = make(chan struct{})
	}
	s.routing++
	return true
}

func (s *Server) routingEnded() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.routing--
	if s.routing == 0 {
		close(s.idle)
	}
}

// Refuse makes the Server refuse every new routing stream (gRPC status
// Unavailable: Envoy answers 503, or routes by its own policy where
// failure_mode_allow is set), for the end of a drain.
func (s *Server) Refuse() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.refusing = true
}

// Drain waits until no routing stream is open, or ctx is done, and says
// which. New streams are served as before while it waits (unless Refuse
// was called): a process that is going away keeps routing until the last
// moment. Observer streams are not waited for; a response never depends on
// them.
func (s *Server) Drain(ctx context.Context) error {
	s.mu.Lock()
	if s.routing == 0 {
		s.mu.Unlock()
		return nil
	}
	idle := s.idle
	s.mu.Unlock()
	select {
	case <-idle:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("routing streams still open: %w", ctx.Err())
	}
}

// SubsetNamespace and SubsetKey locate the Endpoint Picker Protocol's
// subset hint in the metadata Envoy forwards (metadata_options
// forwarding_namespaces untyped: [envoy.lb.subset_hint]).
const (
	SubsetNamespace = "envoy.lb.subset_hint"
	SubsetKey       = "x-gateway-destination-endpoint-subset"
)

// subsetHint reads the subset hint from md: a list of strings, or one
// comma-separated string. ok is false when md carries none.
func subsetHint(md *corev3.Metadata) (subset []string, ok bool) {
	v, ok := md.GetFilterMetadata()[SubsetNamespace].GetFields()[SubsetKey]
	if !ok {
		return nil, false
	}
	subset = []string{}
	if l := v.GetListValue(); l != nil {
		for _, e := range l.GetValues() {
			subset = append(subset, e.GetStringValue())
		}
		return subset, true
	}
	for _, a := range strings.Split(v.GetStringValue(), ",") {
		if a = strings.TrimSpace(a); a != "" {
			subset = append(subset, a)
		}
	}
	return subset, true
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

// recvErr is what a stream's handler returns when Recv failed with err:
// nothing when Envoy ended the stream, else err.
func recvErr(ctx context.Context, err error) error {
	if isStreamEnd(ctx, err) {
		return nil
	}
	return err
}

// routingStream is the state of one routing stream: the stream of the
// filter that routes requests, which sees the request and then the
// response headers (and the response body, when it is STREAMED).
type routingStream struct {
	s    *Server
	grpc extprocv3.ExternalProcessor_ProcessServer

	reqMode, respMode filterv3.ProcessingMode_BodySendMode

	req      Request
	decided  bool       // the request has been routed or rejected
	flight   *claimable // nil until routed
	observed bool       // an observer stream follows the response
}

// end runs when the stream ends: unless an observer took the response over,
// the flight ends with it.
func (rs *routingStream) end() {
	if rs.flight != nil && !rs.observed {
		rs.s.forget(rs.flight)
		rs.flight.End(StreamEnded)
	}
}

// handle answers one message; done reports that the stream is finished.
func (rs *routingStream) handle(req *extprocv3.ProcessingRequest) (done bool, err error) {
	switch r := req.Request.(type) {
	case *extprocv3.ProcessingRequest_RequestHeaders:
		return rs.requestHeaders(r.RequestHeaders)
	case *extprocv3.ProcessingRequest_RequestBody:
		return rs.requestBody(r.RequestBody)
	case *extprocv3.ProcessingRequest_RequestTrailers:
		return rs.requestTrailers()
	case *extprocv3.ProcessingRequest_ResponseHeaders:
		rs.responseHeaders(r.ResponseHeaders, responseHeaders(req, rs.s.cfg.MetadataNamespace))
		// With an observer following a response that Envoy does not send
		// this stream, the stream is done: end it, so that the response no
		// longer depends on it.
		return rs.observed && rs.respMode == filterv3.ProcessingMode_NONE, rs.grpc.Send(responseHeadersReply())
	case *extprocv3.ProcessingRequest_ResponseBody:
		if rs.flight != nil && !rs.observed {
			rs.flight.ResponseBody(r.ResponseBody.GetBody(), r.ResponseBody.GetEndOfStream())
		}
		return false, rs.grpc.Send(responseBodyReply(r.ResponseBody, rs.respMode))
	case *extprocv3.ProcessingRequest_ResponseTrailers:
		if rs.flight != nil && !rs.observed {
			rs.flight.End(ResponseEnded)
		}
		return false, rs.grpc.Send(responseTrailersReply())
	}
	// An unknown message type from a newer Envoy: nothing to answer.
	return false, nil
}

func (rs *routingStream) requestHeaders(h *extprocv3.HttpHeaders) (bool, error) {
	contentLength := int64(-1)
	// Only the values read are copied out of the message: a request has a
	// dozen headers or more, and each copy is an allocation.
	for _, hv := range h.GetHeaders().GetHeaders() {
		switch strings.ToLower(hv.GetKey()) {
		case ":path":
			rs.req.Path = headerValue(hv)
		case ":method":
			rs.req.Method = headerValue(hv)
		case "content-type":
			rs.req.ContentType = headerValue(hv)
		case "content-length":
			if n, err := strconv.ParseInt(headerValue(hv), 10, 64); err == nil {
				contentLength = n
			}
		case "x-request-id":
			rs.req.RequestID = headerValue(hv)
		case "anthropic-version":
			rs.req.Anthropic = true
		}
	}
	rs.req.HasBody = !h.GetEndOfStream()
	switch rs.reqMode {
	case filterv3.ProcessingMode_BUFFERED, filterv3.ProcessingMode_FULL_DUPLEX_STREAMED:
	default:
		if rs.req.HasBody {
			return rs.reject(errUnsupportedMode(rs.reqMode))
		}
	}
	if contentLength > rs.s.cfg.MaxBodyBytes {
		return rs.reject(errTooLarge(rs.s.cfg.MaxBodyBytes))
	}
	if !rs.req.HasBody {
		// No body: route now, in the headers reply.
		return rs.route(viaHeaders)
	}
	if rej := rs.s.router.Admit(&rs.req); rej != nil {
		return rs.reject(rej)
	}
	if rs.reqMode == filterv3.ProcessingMode_FULL_DUPLEX_STREAMED {
		// The headers reply waits for the whole body: it carries the route.
		return false, nil
	}
	// Envoy holds the headers for the body; the body reply sets the
	// destination. Remove a client-sent one now, so that no path (trailers
	// without a body, say) can forward it.
	return false, rs.grpc.Send(removeHeaderReply(rs.s.cfg.DestinationHeader))
}

func (rs *routingStream) requestBody(b *extprocv3.HttpBody) (bool, error) {
	if rs.decided {
		// A duplicate end of stream, or data after it: routed already.
		rs.s.log.Debug("request body after end of stream ignored", "path", rs.req.Path, "request_id", rs.req.RequestID)
		return false, nil
	}
	if int64(len(rs.req.Body))+int64(len(b.GetBody())) > rs.s.cfg.MaxBodyBytes {
		return rs.reject(errTooLarge(rs.s.cfg.MaxBodyBytes))
	}
	if rs.reqMode != filterv3.ProcessingMode_FULL_DUPLEX_STREAMED {
		// BUFFERED: this one message is the whole body, whether or not
		// trailers follow.
		rs.req.Body = b.GetBody()
		return rs.route(viaBody)
	}
	rs.req.Body = append(rs.req.Body, b.GetBody()...)
	if !b.GetEndOfStream() {
		return false, nil
	}
	return rs.route(viaDuplex)
}

func (rs *routingStream) requestTrailers() (bool, error) {
	switch {
	case rs.decided:
	case rs.reqMode == filterv3.ProcessingMode_FULL_DUPLEX_STREAMED:
		// The trailers end the body.
		if done, err := rs.route(viaDuplex); done || err != nil {
			return done, err
		}
	default:
		// BUFFERED with trailers but no body: Envoy sends no body message,
		// and the headers can no longer be changed, so there is no way to
		// route the request.
		return rs.reject(errNoBody())
	}
	return false, rs.grpc.Send(requestTrailersReply())
}

// routeVia says which reply carries the route.
type routeVia int

const (
	viaHeaders routeVia = iota // no body: the headers reply
	viaBody                    // BUFFERED: the body reply (Envoy still holds the headers)
	viaDuplex                  // FULL_DUPLEX_STREAMED: the held headers reply, then the body echoed
)

// route asks the Router where the request goes and sends the reply that
// carries the destination (and, in FULL_DUPLEX_STREAMED mode, the body).
// The body is not kept past it: the stream lives as long as the response.
func (rs *routingStream) route(via routeVia) (bool, error) {
	rs.decided = true
	s := rs.s
	f, rej := s.router.Route(&rs.req)
	body := rs.req.Body
	rs.req.Body = nil
	if rej != nil {
		return rs.reject(rej)
	}
	rs.flight = &claimable{Flight: f}
	dests := f.Destinations()
	list := strings.Join(dests, ",")
	set := []headerPair{{s.cfg.DestinationHeader, dests[0]}}
	if s.cfg.DestinationList {
		set[0].value = list
	}
	if s.cfg.Observer {
		s.offer(rs.flight)
		set = append(set, headerPair{s.cfg.LeaseHeader, rs.flight.id})
	}
	// The metadata carries the Endpoint Picker Protocol's ordered list: the
	// chosen host, then fallbacks that override_host tries on a retry. The
	// header stays a single address, as ORIGINAL_DST requires.
	md := destinationMetadata(s.cfg.MetadataNamespace, s.cfg.DestinationHeader, list)
	err := rs.grpc.Send(routingReply(via, set, md))
	if err != nil || via != viaDuplex {
		return false, err
	}
	return false, rs.sendChunks(body)
}

// sendChunks streams body back to Envoy in FULL_DUPLEX_STREAMED mode, in
// chunks of at most ChunkBytes, the last one marked end of stream.
func (rs *routingStream) sendChunks(body []byte) error {
	for {
		n := min(len(body), ChunkBytes)
		last := n == len(body)
		err := rs.grpc.Send(requestBodyChunk(body[:n], last))
		if err != nil || last {
			return err
		}
		body = body[n:]
	}
}

// responseHeaders decides who follows the response. This stream does when
// it will see the rest (no body, or a response body it is sent). Otherwise
// an observer stream does, if one is configured: one that already claimed
// the request, or one that claims it within Config.ObserverGrace; if none
// does, the headers are the last thing seen of the response. With neither
// an observer nor a response body sent to this stream, the Flight is told
// that the body stays hidden.
func (rs *routingStream) responseHeaders(h *extprocv3.HttpHeaders, headers Headers) {
	f, s := rs.flight, rs.s
	if f == nil || rs.observed {
		return
	}
	eos := h.GetEndOfStream()
	if !eos && rs.respMode == filterv3.ProcessingMode_NONE && s.cfg.Observer {
		rs.observed = true
		f.ResponseHeaders(headers, BodyShown)
		if f.claim.Load() != claimOpen {
			return // claimed already
		}
		requestID := rs.req.RequestID
		s.afterGrace(func() {
			if !f.claim.CompareAndSwap(claimOpen, claimClosed) {
				return
			}
			s.forget(f)
			s.m.observerClaims.WithLabelValues("observer", "none").Inc()
			s.log.Warn("no observer stream claimed a routed request; is the observer filter configured?",
				"request_id", requestID, "grace", s.cfg.ObserverGrace)
			f.End(HeadersOnly)
		})
		return
	}
	if !f.claim.CompareAndSwap(claimOpen, claimClosed) {
		// An observer claimed it and sees the same response.
		rs.observed = true
		return
	}
	s.forget(f)
	switch {
	case eos:
		f.ResponseHeaders(headers, NoBody)
	case rs.respMode == filterv3.ProcessingMode_NONE:
		f.ResponseHeaders(headers, BodyHidden)
	default:
		f.ResponseHeaders(headers, BodyShown)
	}
}

// reject answers the client directly and ends the stream.
func (rs *routingStream) reject(r *Rejection) (bool, error) {
	rs.decided = true
	if r.Status >= 400 {
		rs.s.m.rejections.WithLabelValues(r.Reason).Inc()
	}
	level := slog.LevelDebug
	if rs.s.cfg.LogRejections && r.Status >= 400 {
		level = slog.LevelInfo
	}
	rs.s.log.Log(context.Background(), level, "rejected", "request_id", rs.req.RequestID, "path", rs.req.Path,
		"status", r.Status, "reason", r.Reason, "message", r.Error.Message)
	err := rs.grpc.Send(immediateResponse(r, rs.req.Path))
	if rs.flight != nil {
		rs.flight.End(Rejected)
	}
	return true, err
}

// HTTP/2 flow-control windows of the ext_proc listener: fixed, so that
// grpc-go does not estimate the bandwidth-delay product (BDP), which costs a
// PING, and a connection WINDOW_UPDATE ahead of it, for nearly every DATA
// frame Envoy sends when requests are small and the link is loopback.
//
// A window bounds only what Envoy may send ahead of tokenlb's reading, never
// the size of a message: when tokenlb starts reading a message larger than
// the stream's window (an 8 MiB BUFFERED body), grpc-go opens the window by
// the whole message at once, so a larger body costs one WINDOW_UPDATE, not a
// stall. StreamWindowBytes (1 MiB) holds a prompt of about 250,000 tokens,
// so that only the longest requests' bodies wait for one; it is also the
// most unread data one stream can leave in tokenlb's memory. ConnWindowBytes (16 MiB, grpc-go's own ceiling for the estimated
// window) is what all of a connection's streams together may have in flight;
// grpc-go acknowledges it as data arrives, whether or not a stream reads,
// every quarter of it.
const (
	StreamWindowBytes = 1 << 20
	ConnWindowBytes   = 16 << 20
)

// GRPCServerOptions returns the gRPC server options a Server needs:
//   - a receive limit above maxBodyBytes, since Envoy sends a buffered body
//     as one message and grpc-go refuses messages over 4 MiB by default;
//   - static flow-control windows (StreamWindowBytes, ConnWindowBytes);
//   - as many stream workers as GOMAXPROCS: a new stream runs on an idle
//     worker goroutine, whose stack has already grown, instead of a new
//     goroutine. A worker is busy for as long as its stream (a response's
//     length), and a stream that finds none idle gets a new goroutine, as
//     without workers.
//
// BenchmarkServe measures the last two against grpc-go's defaults: the
// windows remove the server's PINGs and WINDOW_UPDATEs (2.4 and 2.2 a
// request with two streams open, 0.18 and 0.27 with 32); with two streams
// the windows take 5% off the server's CPU a request and the workers 6%
// more (11% in all); with 32, the difference is within the noise.
func GRPCServerOptions(maxBodyBytes int64) []grpc.ServerOption {
	if maxBodyBytes <= 0 {
		maxBodyBytes = DefaultMaxBodyBytes
	}
	return []grpc.ServerOption{
		grpc.MaxRecvMsgSize(int(maxBodyBytes) + 1<<20),
		grpc.InitialWindowSize(StreamWindowBytes),
		grpc.InitialConnWindowSize(ConnWindowBytes),
		grpc.NumStreamWorkers(uint32(runtime.GOMAXPROCS(0))),
	}
}
