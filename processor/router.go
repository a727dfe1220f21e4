package processor

import (
	"strings"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/tokenlb/tokenlb/llmapi"
)

// Router decides where requests go and follows them to their end. The
// Server calls it from many streams at once: it must be safe for concurrent
// use. Package route is tokenlb's Router.
type Router interface {
	// Admit is called at a request's headers when a body follows, before
	// it is read: a non-nil Rejection answers the client at once.
	Admit(r *Request) *Rejection
	// Route is called once per request, with its whole body (or at its
	// headers when it has none), and either routes it or rejects it:
	// exactly one of the Flight and the Rejection is non-nil, and a
	// Flight has at least one destination.
	Route(r *Request) (Flight, *Rejection)
}

// Request is what the Server knows of an HTTP request when it asks the
// Router.
type Request struct {
	Method, Path, ContentType string
	// RequestID is Envoy's x-request-id, for logs.
	RequestID string
	// Anthropic says the client sent anthropic-version: it speaks
	// Anthropic's API (a list of models in Anthropic's shape).
	Anthropic bool
	// HasBody says a body follows the headers (or followed them); Body is
	// the whole of it when Route is called (the Server drops it after).
	HasBody bool
	Body    []byte
	// Subset is the Endpoint Picker Protocol's subset hint, the endpoints
	// the data plane allows for this request (envoy.lb.subset_hint
	// metadata, key x-gateway-destination-endpoint-subset); nil when none
	// was given, empty when an empty one was.
	Subset []string
}

// Flight is a routed request, from the routing decision to the end of its
// response. Its methods are called from up to three streams, possibly at
// once (the routing stream hands the response headers over while the
// observer stream that claimed the request shows the response, and the end
// stream reports the request's end; any may end first): a
// Flight must be safe for concurrent use, and end once, whichever End (or
// ending ResponseHeaders or ResponseBody) comes first.
type Flight interface {
	// Destinations lists where the request goes: the chosen host first,
	// then the hosts a proxy may retry it on, each a literal ip:port.
	Destinations() []string
	// ResponseHeaders delivers the response's headers; next says what the
	// Flight will be shown of the rest. It may be called twice, by the
	// routing stream and by the observer stream that follows the response,
	// in either order.
	ResponseHeaders(h Headers, next Next)
	// ResponseBody delivers a chunk of the response body; end says it is
	// the last. more says whether the Flight needs the rest of the body
	// (false: only its end); the Server may then stop showing it, when an
	// end stream will report the end, and says so with Unfollow. A Flight
	// that is shown the rest anyway uses it as before.
	ResponseBody(chunk []byte, end bool) (more bool)
	// Unfollow says the Server stopped showing the body after a
	// ResponseBody that asked for no more: only End follows.
	Unfollow()
	// End says the response is over, or that nothing more of it will be
	// seen, and how.
	End(how Ending)
}

// Next says what a Flight is shown of a response after its headers.
type Next int

const (
	// BodyShown: the body follows, in ResponseBody calls, then End.
	BodyShown Next = iota
	// NoBody: the response ended with its headers.
	NoBody
	// BodyHidden: a body follows that no stream shows; End comes when the
	// routing stream ends (with response trailers SEND, Envoy holds it
	// open to the end of the response; otherwise at once).
	BodyHidden
)

// Ending says how a Flight's response ended, as the Server saw it.
type Ending int

const (
	// ResponseEnded: the response body, or its trailers, ended.
	ResponseEnded Ending = iota
	// HeadersOnly: the headers are the last of the response anyone will
	// see (no observer stream claimed it in time).
	HeadersOnly
	// StreamEnded: the stream ended before the response did (client
	// abort, upstream reset, timeout, Envoy gone).
	StreamEnded
	// Rejected: tokenlb answered the client itself.
	Rejected
	// Closed: the end stream closed, which Envoy does once the request is
	// over (its response ended, or it was abandoned): nobody saw which.
	Closed
)

// Headers are an HTTP message's headers as Envoy sent them, with what Envoy
// said of the response besides.
type Headers struct {
	m             *corev3.HeaderMap
	served        string
	connectFailed bool
}

// ResponseFlagsAttribute is the Envoy attribute that tells a local reply
// for a failed connection from a backend's own answer: the ext_proc
// filters send it with the response headers when their response_attributes
// list it (deploy/envoy.yaml). It is Envoy's response flags as a bit
// vector, computed by Envoy: neither the client nor a backend can set it.
const ResponseFlagsAttribute = "response.flags"

// upstreamConnectionFailure is response flag UF's bit in
// ResponseFlagsAttribute: Envoy could not connect to the host (refused,
// unreachable or timed out), and answered the client itself, with a 503.
const upstreamConnectionFailure = 1 << 5

// ConnectFailed says that Envoy reported it could not connect to the host
// the request went to (response flag UF): the response is Envoy's own,
// and no backend answered.
func (h Headers) ConnectFailed() bool { return h.connectFailed }

// connectFailed reads ResponseFlagsAttribute from the attributes Envoy
// sent with a message. Envoy keys them by its ext_proc filter's type name
// (envoy.filters.http.ext_proc), whatever the filter's own name; any key
// is read, which a newer Envoy may change.
func connectFailed(attrs map[string]*structpb.Struct) bool {
	for _, a := range attrs {
		v, ok := a.GetFields()[ResponseFlagsAttribute]
		if !ok {
			continue
		}
		if f := v.GetNumberValue(); f > 0 && f < 1<<53 && uint64(f)&upstreamConnectionFailure != 0 {
			return true
		}
	}
	return false
}

// ServedKey is where the Endpoint Picker Protocol has the data plane say,
// on the response path, which endpoint served the request: a key in the
// envoy.lb metadata (DefaultMetadataNamespace) Envoy forwards.
const ServedKey = "x-gateway-destination-endpoint-served"

// Served returns the endpoint the data plane reports served the request
// (ServedKey), or "" when it reported none.
func (h Headers) Served() string { return h.served }

// responseHeaders is a response headers message as the Router sees it:
// the headers, the endpoint the data plane reports serving them (ServedKey
// in the metadata namespace ns) and whether Envoy could not connect.
func responseHeaders(req *extprocv3.ProcessingRequest, ns string) Headers {
	return Headers{req.GetResponseHeaders().GetHeaders(), served(req.GetMetadataContext(), ns), connectFailed(req.GetAttributes())}
}

// served reads ServedKey from the metadata Envoy forwarded with a message.
func served(md *corev3.Metadata, namespace string) string {
	return md.GetFilterMetadata()[namespace].GetFields()[ServedKey].GetStringValue()
}

// Lookup returns the last value of the header named key (in lower case;
// header names are matched in any case), and whether there was one.
func (h Headers) Lookup(key string) (value string, ok bool) {
	for _, hv := range h.m.GetHeaders() {
		if strings.ToLower(hv.GetKey()) == key {
			value, ok = headerValue(hv), true
		}
	}
	return value, ok
}

// Rejection is an answer tokenlb gives the client itself, in place of the
// backend's.
type Rejection struct {
	Status int
	// Reason names the rejection in tokenlb_rejections_total and in
	// Envoy's response details ("tokenlb_" + Reason).
	Reason string
	// Error is the answer, written in the shape the request's API has its
	// clients expect (llmapi.Error.Body).
	Error llmapi.Error
	// Body, when set, is the answer instead (a status below 400: tokenlb
	// answered the request itself, as for the list of models, and nothing
	// counts it as a rejection).
	Body []byte
	// RetryAfter, when positive, is sent as retry-after (whole seconds,
	// at least 1).
	RetryAfter time.Duration
}
