package processor

import (
	"crypto/rand"
	"sync/atomic"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
)

// claimable is a routed request's Flight with what it takes for an observer
// stream to find it and take over following its response.
type claimable struct {
	Flight
	id    string // the lease header's value; "" without an observer
	claim atomic.Int32
}

// Whether an observer stream may still claim a request. The routing stream
// holds the request open for a claim until its response headers; by then an
// observer may have claimed it.
const (
	claimOpen   int32 = iota // the routing stream follows it, a claim may come
	claimTaken               // an observer stream claimed it first
	claimClosed              // the routing stream kept it, or gave up waiting
)

// offer makes f claimable by an observer stream, under a fresh lease id.
func (s *Server) offer(f *claimable) {
	f.id = rand.Text()
	s.mu.Lock()
	s.pending[f.id] = f
	s.mu.Unlock()
}

// forget removes f from the requests an observer may claim.
func (s *Server) forget(f *claimable) {
	if f.id != "" {
		s.mu.Lock()
		delete(s.pending, f.id)
		s.mu.Unlock()
	}
}

// observe serves a stream from the observability-mode filter: Envoy sends
// it the request headers and the response as they pass, and ignores any
// answer. The request headers carry the lease header the routing stream set;
// the stream claims that request and shows its Flight the response to the
// end, or ends it if the stream ends first (Envoy ends it when the HTTP
// stream is destroyed, after deferred_close_timeout at most).
func (s *Server) observe(stream extprocv3.ExternalProcessor_ProcessServer) error {
	s.m.streams.Inc()
	defer s.m.streams.Dec()
	var f *claimable
	defer func() {
		if f != nil {
			f.End(StreamEnded)
		}
	}()
	for {
		req, err := stream.Recv()
		if err != nil {
			if isStreamEnd(stream.Context(), err) {
				return nil
			}
			return err
		}
		switch r := req.Request.(type) {
		case *extprocv3.ProcessingRequest_RequestHeaders:
			if f == nil {
				f = s.claim(r.RequestHeaders)
			}
		case *extprocv3.ProcessingRequest_ResponseHeaders:
			if f != nil {
				next := BodyShown
				if r.ResponseHeaders.GetEndOfStream() {
					next = NoBody
				}
				f.ResponseHeaders(responseHeaders(req, s.cfg.MetadataNamespace), next)
			}
		case *extprocv3.ProcessingRequest_ResponseBody:
			if f != nil {
				f.ResponseBody(r.ResponseBody.GetBody(), r.ResponseBody.GetEndOfStream())
			}
		case *extprocv3.ProcessingRequest_ResponseTrailers:
			if f != nil {
				f.End(ResponseEnded)
			}
		}
	}
}

// claim finds the routed request named by the lease header and takes over
// following its response, unless its routing stream decided to follow it
// itself or gave up waiting.
func (s *Server) claim(h *extprocv3.HttpHeaders) *claimable {
	var id string
	for _, hv := range h.GetHeaders().GetHeaders() {
		if hv.GetKey() == s.cfg.LeaseHeader {
			id = headerValue(hv)
		}
	}
	s.mu.Lock()
	f := s.pending[id]
	s.mu.Unlock()
	switch {
	case f == nil:
		s.m.observerClaims.WithLabelValues("unknown").Inc()
		return nil
	case !f.claim.CompareAndSwap(claimOpen, claimTaken):
		s.m.observerClaims.WithLabelValues("late").Inc()
		return nil
	}
	s.forget(f)
	s.m.observerClaims.WithLabelValues("claimed").Inc()
	return f
}
