package processor

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"

	"github.com/tokenlb/tokenlb/tokenizer"
)

// apiError is an answer tokenlb gives the client itself, shaped like an
// OpenAI API error so that SDKs surface its message.
type apiError struct {
	status     int
	kind       string // OpenAI error "type"
	code       string // OpenAI error "code"
	reason     string // metric label and Envoy response details
	message    string
	param      string // OpenAI error "param", if any
	retryAfter time.Duration
}

func (e *apiError) body() []byte {
	type inner struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    string  `json:"code"`
	}
	v := struct {
		Error inner `json:"error"`
	}{inner{Message: e.message, Type: e.kind, Code: e.code}}
	if e.param != "" {
		v.Error.Param = &e.param
	}
	b, _ := json.Marshal(v)
	return b
}

func (e *apiError) immediateResponse() *extprocv3.ImmediateResponse {
	headers := []*corev3.HeaderValueOption{{
		Header:       &corev3.HeaderValue{Key: "content-type", RawValue: []byte("application/json")},
		AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
	}}
	if e.retryAfter > 0 {
		secs := max(1, int(e.retryAfter.Round(time.Second)/time.Second))
		headers = append(headers, &corev3.HeaderValueOption{
			Header:       &corev3.HeaderValue{Key: "retry-after", RawValue: []byte(strconv.Itoa(secs))},
			AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
		})
	}
	return &extprocv3.ImmediateResponse{
		Status:  &typev3.HttpStatus{Code: typev3.StatusCode(e.status)},
		Headers: &extprocv3.HeaderMutation{SetHeaders: headers},
		Body:    e.body(),
		Details: "tokenlb_" + e.reason,
	}
}

func errPrompt(err error) *apiError {
	e := &apiError{status: 400, kind: "invalid_request_error", message: err.Error()}
	switch {
	case errors.Is(err, tokenizer.ErrTooDeep):
		e.code, e.reason = "json_too_deep", "json_too_deep"
	case errors.Is(err, tokenizer.ErrInvalidJSON):
		e.code, e.reason = "invalid_json", "invalid_json"
	default:
		e.code, e.reason = "missing_prompt", "missing_prompt"
	}
	return e
}

func errTooLarge(limit int64) *apiError {
	return &apiError{status: 413, kind: "invalid_request_error", code: "request_too_large", reason: "body_too_large",
		message: fmt.Sprintf("request body is larger than the %d-byte limit", limit)}
}

func errMediaType(ct string) *apiError {
	return &apiError{status: 415, kind: "invalid_request_error", code: "unsupported_media_type", reason: "unsupported_media_type",
		message: fmt.Sprintf("content-type %q is not JSON; send application/json", ct)}
}

func errNoCapacity(retryAfter time.Duration) *apiError {
	return &apiError{status: 503, kind: "server_error", code: "no_capacity", reason: "no_capacity", retryAfter: retryAfter,
		message: "every backend is at its in-flight token limit; retry later"}
}

func errUnknownModel(model string) *apiError {
	if len(model) > 256 {
		model = model[:256] + "..."
	}
	return &apiError{status: 404, kind: "invalid_request_error", code: "model_not_found", reason: "unknown_model",
		param: "model", message: fmt.Sprintf("The model %q does not exist or no backend serves it.", model)}
}

func errUnsupportedMode(m filterv3.ProcessingMode_BodySendMode) *apiError {
	return &apiError{status: 500, kind: "server_error", code: "proxy_misconfigured", reason: "unsupported_body_mode",
		message: fmt.Sprintf("the proxy sends request bodies in %s mode; tokenlb needs BUFFERED or FULL_DUPLEX_STREAMED", m)}
}

func errNoBody() *apiError {
	return &apiError{status: 400, kind: "invalid_request_error", code: "missing_prompt", reason: "trailers_without_body",
		message: "request has trailers but no body; send the JSON request in the body"}
}
