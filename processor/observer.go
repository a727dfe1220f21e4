package processor

import (
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"

	"github.com/tokenlb/tokenlb/picker"
)

// observe serves a stream from the observability-mode filter: Envoy sends
// it the request headers and the response as they pass, and ignores any
// answer. The request headers carry the lease header the routing stream set;
// the stream claims that request and follows its response to the end,
// releasing the prefill part at the first token and the rest at the end, or
// everything if the stream ends first (Envoy ends it when the HTTP stream is
// destroyed, after deferred_close_timeout at most).
func (s *Server) observe(stream extprocv3.ExternalProcessor_ProcessServer) error {
	s.m.streams.Inc()
	defer s.m.streams.Dec()
	var t *tracker
	defer func() {
		if t != nil {
			t.abort()
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
			if t == nil {
				t = s.claim(r.RequestHeaders)
			}
		case *extprocv3.ProcessingRequest_ResponseHeaders:
			if t != nil {
				t.responseHeaders(r.ResponseHeaders.GetHeaders(), r.ResponseHeaders.GetEndOfStream())
			}
		case *extprocv3.ProcessingRequest_ResponseBody:
			if t != nil {
				t.responseBody(r.ResponseBody.GetBody(), r.ResponseBody.GetEndOfStream())
			}
		case *extprocv3.ProcessingRequest_ResponseTrailers:
			if t != nil {
				t.finish(picker.ResponseEnd)
			}
		}
	}
}

// claim finds the routed request named by the lease header and takes over
// following its response, unless its routing stream decided to follow it
// itself or gave up waiting.
func (s *Server) claim(h *extprocv3.HttpHeaders) *tracker {
	var id string
	for _, hv := range h.GetHeaders().GetHeaders() {
		if hv.GetKey() == s.cfg.LeaseHeader {
			id = headerValue(hv)
		}
	}
	s.mu.Lock()
	t := s.pending[id]
	s.mu.Unlock()
	switch {
	case t == nil:
		s.m.observerClaims.WithLabelValues("unknown").Inc()
		return nil
	case !t.owner.CompareAndSwap(ownerRouter, ownerObserver):
		s.m.observerClaims.WithLabelValues("late").Inc()
		return nil
	}
	s.forget(t)
	s.m.observerClaims.WithLabelValues("claimed").Inc()
	return t
}
