package llmapi

import "encoding/json"

// Error is an API error, written in the shape the request's API has its
// clients expect (Body): OpenAI's, which OpenAI-compatible SDKs surface as
// it is, or Anthropic's on the Messages API.
type Error struct {
	Message string
	// Type is the error's OpenAI "type": invalid_request_error,
	// server_error, rate_limit_error.
	Type string
	// Code is a machine-readable code, such as model_not_found.
	Code string
	// Param names the request field at fault; "" for none (sent as null).
	Param string
}

// Body returns the error's JSON body for a request to api answered with
// status: Anthropic's shape for Messages, OpenAI's for the rest.
func (e Error) Body(api API, status int) []byte {
	if api == Messages {
		return e.anthropic(status)
	}
	return e.JSON()
}

// JSON returns the error's body in OpenAI's shape:
// {"error": {"message", "type", "param", "code"}}.
func (e Error) JSON() []byte {
	type inner struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    string  `json:"code"`
	}
	v := struct {
		Error inner `json:"error"`
	}{inner{Message: e.Message, Type: e.Type, Code: e.Code}}
	if e.Param != "" {
		v.Error.Param = &e.Param
	}
	b, _ := json.Marshal(v)
	return b
}

// anthropic returns the error's body in Anthropic's shape,
// {"type": "error", "error": {"type", "message"}}, whose type names follow
// the status as Anthropic's API documents them.
func (e Error) anthropic(status int) []byte {
	v := struct {
		Type  string `json:"type"`
		Error struct {
			Type    string `json:"type"`
			Message string `json:"message"`
		} `json:"error"`
	}{Type: "error"}
	v.Error.Type, v.Error.Message = AnthropicErrorType(status), e.Message
	b, _ := json.Marshal(v)
	return b
}

// AnthropicErrorType is the Anthropic error type of an HTTP status.
func AnthropicErrorType(status int) string {
	switch status {
	case 400, 415, 422:
		return "invalid_request_error"
	case 401:
		return "authentication_error"
	case 403:
		return "permission_error"
	case 404:
		return "not_found_error"
	case 413:
		return "request_too_large"
	case 429:
		return "rate_limit_error"
	case 503, 529:
		return "overloaded_error"
	}
	if status >= 400 && status < 500 {
		return "invalid_request_error"
	}
	return "api_error"
}
