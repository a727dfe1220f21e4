package route

import (
	"errors"
	"fmt"
	"time"

	"github.com/tokenlb/tokenlb/llmapi"
	"github.com/tokenlb/tokenlb/processor"
)

// The Router's rejections, each an error with its status and the reason
// tokenlb_rejections_total counts it under; the processor writes it in the
// shape of the request's API (OpenAI's, or Anthropic's on /v1/messages).

// Reasons are the reasons of the Router's rejections, for metrics that
// show each from the start (processor.Metrics.ExpectRejections).
var Reasons = []string{"missing_prompt", "json_too_deep", "invalid_json", "invalid_type", "unsupported_media_type",
	"no_capacity", "not_in_subset", "unknown_model"}

func reject(status int, reason string, e llmapi.Error) *processor.Rejection {
	return &processor.Rejection{Status: status, Reason: reason, Error: e}
}

func errPrompt(err error) *processor.Rejection {
	code := "missing_prompt"
	switch {
	case errors.Is(err, llmapi.ErrTooDeep):
		code = "json_too_deep"
	case errors.Is(err, llmapi.ErrInvalidJSON):
		code = "invalid_json"
	case errors.Is(err, llmapi.ErrNotObject):
		code = "invalid_type"
	}
	return reject(400, code, llmapi.Error{Type: "invalid_request_error", Code: code, Message: err.Error()})
}

func errMediaType(ct string) *processor.Rejection {
	return reject(415, "unsupported_media_type", llmapi.Error{Type: "invalid_request_error", Code: "unsupported_media_type",
		Message: fmt.Sprintf("content-type %q is not JSON; send application/json", ct)})
}

func errNoCapacity(retryAfter time.Duration) *processor.Rejection {
	// 429, as the Endpoint Picker Protocol has a picker answer when it
	// sheds load: the client may retry after retry-after, and Envoy's
	// retry and outlier policies, which count 5xx, leave it alone.
	r := reject(429, "no_capacity", llmapi.Error{Type: "rate_limit_error", Code: "no_capacity",
		Message: "every backend is at its in-flight token limit; retry later"})
	r.RetryAfter = retryAfter
	return r
}

// errNotInSubset is the Endpoint Picker Protocol's answer when the data
// plane's subset hint leaves no endpoint: 503.
func errNotInSubset(subset []string) *processor.Rejection {
	return reject(503, "not_in_subset", llmapi.Error{Type: "server_error", Code: "not_in_subset",
		Message: fmt.Sprintf("no endpoint of the %d the gateway allows for this request can take it", len(subset))})
}

func errUnknownModel(model string) *processor.Rejection {
	if len(model) > 256 {
		model = model[:256] + "..."
	}
	return reject(404, "unknown_model", llmapi.Error{Type: "invalid_request_error", Code: "model_not_found", Param: "model",
		Message: fmt.Sprintf("The model %q does not exist or no backend serves it.", model)})
}
