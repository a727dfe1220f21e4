package llmapi

import "encoding/json"

// Error is an API error in OpenAI's shape, which OpenAI-compatible SDKs
// surface as it is: {"error": {"message", "type", "param", "code"}}.
type Error struct {
	Message string
	// Type is the error "type": invalid_request_error, server_error,
	// rate_limit_error.
	Type string
	// Code is a machine-readable code, such as model_not_found.
	Code string
	// Param names the request field at fault; "" for none (sent as null).
	Param string
}

// JSON returns the error's body.
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
