package processor

import (
	"crypto/rand"
	"sync"
	"sync/atomic"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
)

// Two observability-mode filters follow a routed request's response, each
// on a stream of its own that finds the request by the lease header:
//
//   - the observer (role "observer") is shown the response headers and the
//     body, chunk by chunk. It shows the Flight the headers and the body up
//     to the first token, and the rest only if the Flight asks for it
//     (Flight.ResponseBody's more). Otherwise it ends its stream, which is
//     the only way to make Envoy stop sending chunks in observability mode:
//     a streamed response then costs a few messages instead of one a chunk.
//   - the end stream (role "end") is shown the request headers only. Envoy
//     closes it when the request is over, deferred_close_timeout after the
//     response's end (or the client's abort), and that close ends a Flight
//     the observer stopped following.
//
// Whoever follows the response to its end ends the Flight; the end stream
// never ends one that the observer still follows, so a response followed
// for its usage always ends with its body. The observer stops only once
// the end stream has claimed the request: without an end filter (an older
// Envoy config) it follows every response to its end, as it must.

// claimable is a routed request's Flight with what it takes for the
// observer and end streams to find it and take over following its
// response.
type claimable struct {
	Flight
	id    string // the lease header's value; "" without an observer
	claim atomic.Int32

	mu       sync.Mutex
	ender    bool // an end stream claimed it
	enderEnd bool // and has ended
	handed   bool // the observer stopped following: the end stream ends it
}

// Whether an observer stream may still claim a request. The routing stream
// holds the request open for a claim until its response headers; by then an
// observer may have claimed it.
const (
	claimOpen   int32 = iota // the routing stream follows it, a claim may come
	claimTaken               // an observer stream claimed it first
	claimClosed              // the routing stream kept it, or gave up waiting
)

// handOver says whether the observer may stop following the response,
// and if so leaves its end to the end stream: true only when an end stream
// claimed the request and has not ended yet.
func (f *claimable) handOver() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.ender || f.enderEnd {
		return false
	}
	f.handed = true
	return true
}

// endStreamEnded records that the end stream ended and says whether it
// ends the Flight: when the observer handed the response over, or while
// nobody follows the response (the routing stream waits for an observer's
// claim). The observer that follows a response, or a routing stream that
// does, ends it itself.
func (f *claimable) endStreamEnded() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.enderEnd = true
	// While nobody follows it, close the claim too: the routing stream's
	// grace timer then finds it closed, and no observer takes it over.
	return f.handed || f.claim.CompareAndSwap(claimOpen, claimClosed)
}

// offer makes f claimable by the observer and end streams, under a fresh
// lease id.
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

// observe serves a stream from the observer filter: Envoy sends it the
// request headers and the response as they pass, and ignores any answer.
// The request headers carry the lease header the routing stream set; the
// stream claims that request and shows its Flight the response until the
// Flight needs no more of it and an end stream will report the end (then
// it returns, and Envoy stops sending), or to the end. It ends the Flight
// if its stream ends first (Envoy ends it when the HTTP stream is
// destroyed, after deferred_close_timeout at most).
func (s *Server) observe(stream extprocv3.ExternalProcessor_ProcessServer) error {
	s.m.streams.Inc()
	defer s.m.streams.Dec()
	var f *claimable
	defer func() {
		if f != nil {
			s.forget(f)
			f.End(StreamEnded)
		}
	}()
	for {
		req, err := stream.Recv()
		if err != nil {
			return recvErr(stream.Context(), err)
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
				end := r.ResponseBody.GetEndOfStream()
				if more := f.ResponseBody(r.ResponseBody.GetBody(), end); !more && !end && f.handOver() {
					s.m.handovers.Inc()
					f.Unfollow()
					f = nil
					return nil // the end stream ends it; Envoy sends no more
				}
			}
		case *extprocv3.ProcessingRequest_ResponseTrailers:
			if f != nil {
				f.End(ResponseEnded)
			}
		}
	}
}

// watchEnd serves a stream from the end filter: Envoy sends it the request
// headers, whose lease header names the routed request, and closes it when
// the request is over. The close ends the Flight when the observer stopped
// following its response (see claimable.endStreamEnded).
func (s *Server) watchEnd(stream extprocv3.ExternalProcessor_ProcessServer) error {
	s.m.streams.Inc()
	defer s.m.streams.Dec()
	var f *claimable
	defer func() {
		if f != nil && f.endStreamEnded() {
			s.forget(f)
			f.End(Closed)
		}
	}()
	for {
		req, err := stream.Recv()
		if err != nil {
			return recvErr(stream.Context(), err)
		}
		if r, ok := req.Request.(*extprocv3.ProcessingRequest_RequestHeaders); ok && f == nil {
			f = s.claimEnd(r.RequestHeaders)
		}
	}
}

// leaseOf returns the routed request named by h's lease header, or nil.
func (s *Server) leaseOf(h *extprocv3.HttpHeaders) *claimable {
	var id string
	for _, hv := range h.GetHeaders().GetHeaders() {
		if hv.GetKey() == s.cfg.LeaseHeader {
			id = headerValue(hv)
		}
	}
	if id == "" {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pending[id]
}

// claim finds the routed request named by the lease header and takes over
// following its response, unless its routing stream decided to follow it
// itself or gave up waiting.
func (s *Server) claim(h *extprocv3.HttpHeaders) *claimable {
	f := s.leaseOf(h)
	switch {
	case f == nil:
		s.m.observerClaims.WithLabelValues("observer", "unknown").Inc()
		return nil
	case !f.claim.CompareAndSwap(claimOpen, claimTaken):
		s.m.observerClaims.WithLabelValues("observer", "late").Inc()
		return nil
	}
	s.m.observerClaims.WithLabelValues("observer", "claimed").Inc()
	return f
}

// claimEnd finds the routed request named by the lease header for the end
// stream, once: a second end stream for the same request claims nothing.
func (s *Server) claimEnd(h *extprocv3.HttpHeaders) *claimable {
	f := s.leaseOf(h)
	if f == nil {
		s.m.observerClaims.WithLabelValues("end", "unknown").Inc()
		return nil
	}
	f.mu.Lock()
	taken := f.ender
	f.ender = true
	f.mu.Unlock()
	if taken {
		s.m.observerClaims.WithLabelValues("end", "late").Inc()
		return nil
	}
	s.m.observerClaims.WithLabelValues("end", "claimed").Inc()
	return f
}
