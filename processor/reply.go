package processor

import (
	"fmt"
	"strconv"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/tokenlb/tokenlb/llmapi"
)

// This file builds the messages the Server sends Envoy.

type headerPair struct{ key, value string }

// setHeaders overwrites (or adds) each header, as ORIGINAL_DST needs: an
// appended value would leave a client's first.
func setHeaders(hs []headerPair) []*corev3.HeaderValueOption {
	out := make([]*corev3.HeaderValueOption, len(hs))
	for i, h := range hs {
		out[i] = &corev3.HeaderValueOption{
			Header:       &corev3.HeaderValue{Key: h.key, RawValue: []byte(h.value)},
			AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
		}
	}
	return out
}

// routingReply is the reply that routes a request: its header mutation and
// destination metadata go in the reply to the message that completed the
// request (see routeVia).
func routingReply(via routeVia, set []headerPair, md *structpb.Struct) *extprocv3.ProcessingResponse {
	common := &extprocv3.CommonResponse{HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: setHeaders(set)}}
	if via == viaBody {
		return &extprocv3.ProcessingResponse{DynamicMetadata: md,
			Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{Response: common}}}
	}
	return &extprocv3.ProcessingResponse{DynamicMetadata: md,
		Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{Response: common}}}
}

// removeHeaderReply answers the request headers by removing one header.
func removeHeaderReply(name string) *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{
		RequestHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{HeaderMutation: &extprocv3.HeaderMutation{
			RemoveHeaders: []string{name}}}}}}
}

func requestTrailersReply() *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestTrailers{
		RequestTrailers: &extprocv3.TrailersResponse{}}}
}

func responseHeadersReply() *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{
		ResponseHeaders: &extprocv3.HeadersResponse{}}}
}

func responseTrailersReply() *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseTrailers{
		ResponseTrailers: &extprocv3.TrailersResponse{}}}
}

// responseBodyReply answers a response body chunk: in FULL_DUPLEX_STREAMED
// mode by sending the bytes back, in the other modes by letting them
// through unchanged.
func responseBodyReply(b *extprocv3.HttpBody, mode filterv3.ProcessingMode_BodySendMode) *extprocv3.ProcessingResponse {
	r := &extprocv3.BodyResponse{}
	if mode == filterv3.ProcessingMode_FULL_DUPLEX_STREAMED {
		r = streamed(b.GetBody(), b.GetEndOfStream())
	}
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{ResponseBody: r}}
}

// requestBodyChunk is a chunk of the request body streamed back in
// FULL_DUPLEX_STREAMED mode.
func requestBodyChunk(b []byte, last bool) *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{
		RequestBody: streamed(b, last)}}
}

func streamed(b []byte, eos bool) *extprocv3.BodyResponse {
	return &extprocv3.BodyResponse{Response: &extprocv3.CommonResponse{BodyMutation: &extprocv3.BodyMutation{
		Mutation: &extprocv3.BodyMutation_StreamedResponse{StreamedResponse: &extprocv3.StreamedBodyResponse{
			Body: b, EndOfStream: eos}}}}}
}

func destinationMetadata(namespace, key, hosts string) *structpb.Struct {
	return &structpb.Struct{Fields: map[string]*structpb.Value{
		namespace: structpb.NewStructValue(&structpb.Struct{Fields: map[string]*structpb.Value{
			key: structpb.NewStringValue(hosts),
		}}),
	}}
}

// immediateResponse answers the client with r instead of the backend.
func immediateResponse(r *Rejection, path string) *extprocv3.ProcessingResponse {
	hs := []headerPair{{"content-type", "application/json"}}
	if r.RetryAfter > 0 {
		secs := max(1, int(r.RetryAfter.Round(time.Second)/time.Second))
		hs = append(hs, headerPair{"retry-after", strconv.Itoa(secs)})
	}
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ImmediateResponse{
		ImmediateResponse: &extprocv3.ImmediateResponse{
			Status:  &typev3.HttpStatus{Code: typev3.StatusCode(r.Status)},
			Headers: &extprocv3.HeaderMutation{SetHeaders: setHeaders(hs)},
			Body:    r.body(path),
			Details: "tokenlb_" + r.Reason,
		}}}
}

// body is the answer's body for a request to path.
func (r *Rejection) body(path string) []byte {
	if r.Body != nil {
		return r.Body
	}
	return r.Error.Body(llmapi.APIFor(path), r.Status)
}

// headerValue returns a header's value; Envoy sends raw_value, older
// versions value.
func headerValue(h *corev3.HeaderValue) string {
	if rv := h.GetRawValue(); len(rv) > 0 {
		return string(rv)
	}
	return h.GetValue()
}

// The Server's own rejections: what the protocol or its limits refuse.

func reject(status int, reason string, e llmapi.Error) *Rejection {
	return &Rejection{Status: status, Reason: reason, Error: e}
}

func errTooLarge(limit int64) *Rejection {
	return reject(413, "body_too_large", llmapi.Error{Type: "invalid_request_error", Code: "request_too_large",
		Message: fmt.Sprintf("request body is larger than the %d-byte limit", limit)})
}

func errUnsupportedMode(m filterv3.ProcessingMode_BodySendMode) *Rejection {
	return reject(500, "unsupported_body_mode", llmapi.Error{Type: "server_error", Code: "proxy_misconfigured",
		Message: fmt.Sprintf("the proxy sends request bodies in %s mode; tokenlb needs BUFFERED or FULL_DUPLEX_STREAMED", m)})
}

func errNoBody() *Rejection {
	return reject(400, "trailers_without_body", llmapi.Error{Type: "invalid_request_error", Code: "missing_prompt",
		Message: "request has trailers but no body; send the JSON request in the body"})
}
