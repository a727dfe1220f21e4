package llmapi

import (
	"encoding/json"
	"testing"
)

// TestErrorBody: an error is written in OpenAI's shape for every API but
// Anthropic's Messages, which gets Anthropic's shape and type names.
func TestErrorBody(t *testing.T) {
	e := Error{Message: "no such model", Type: "invalid_request_error", Code: "model_not_found", Param: "model"}
	for _, tc := range []struct {
		api    API
		status int
		want   string
	}{
		{Chat, 404, `{"error":{"message":"no such model","type":"invalid_request_error","param":"model","code":"model_not_found"}}`},
		{Responses, 404, `{"error":{"message":"no such model","type":"invalid_request_error","param":"model","code":"model_not_found"}}`},
		{Other, 404, `{"error":{"message":"no such model","type":"invalid_request_error","param":"model","code":"model_not_found"}}`},
		{Messages, 404, `{"type":"error","error":{"type":"not_found_error","message":"no such model"}}`},
		{Messages, 400, `{"type":"error","error":{"type":"invalid_request_error","message":"no such model"}}`},
		{Messages, 413, `{"type":"error","error":{"type":"request_too_large","message":"no such model"}}`},
		{Messages, 415, `{"type":"error","error":{"type":"invalid_request_error","message":"no such model"}}`},
		{Messages, 429, `{"type":"error","error":{"type":"rate_limit_error","message":"no such model"}}`},
		{Messages, 500, `{"type":"error","error":{"type":"api_error","message":"no such model"}}`},
		{Messages, 503, `{"type":"error","error":{"type":"overloaded_error","message":"no such model"}}`},
	} {
		got := e.Body(tc.api, tc.status)
		if string(got) != tc.want {
			t.Errorf("%s %d: %s, want %s", tc.api, tc.status, got, tc.want)
		}
		if !json.Valid(got) {
			t.Errorf("%s %d: not JSON", tc.api, tc.status)
		}
	}
	// No param: null, as OpenAI sends it.
	if got := string(Error{Message: "m", Type: "server_error", Code: "c"}.Body(Chat, 500)); got != `{"error":{"message":"m","type":"server_error","param":null,"code":"c"}}` {
		t.Errorf("no param: %s", got)
	}
}
