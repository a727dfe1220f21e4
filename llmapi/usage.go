package llmapi

import (
	"bytes"
	"strings"
)

// Usage is what a response reports of the tokens it took.
type Usage struct {
	PromptTokens, CompletionTokens int
}

// ParseUsage finds the last usage object in the end of a response body (a
// JSON response, or an event stream's final usage chunk) and reads its
// prompt and completion tokens. It scans bytes rather than parsing JSON: it
// sees only the body's tail, which may be cut anywhere.
func ParseUsage(tail []byte) (Usage, bool) {
	i := bytes.LastIndex(tail, []byte(`"usage"`))
	if i < 0 {
		return Usage{}, false
	}
	obj := tail[i+len(`"usage"`):]
	if end := bytes.IndexByte(obj, '}'); end >= 0 {
		obj = obj[:end]
	}
	p, okP := intField(obj, `"prompt_tokens"`)
	c, okC := intField(obj, `"completion_tokens"`)
	if !okP || !okC {
		return Usage{}, false
	}
	return Usage{p, c}, true
}

// intField reads the non-negative integer after key and a colon.
func intField(obj []byte, key string) (int, bool) {
	i := bytes.Index(obj, []byte(key))
	if i < 0 {
		return 0, false
	}
	rest := bytes.TrimLeft(obj[i+len(key):], " \t\r\n")
	if len(rest) == 0 || rest[0] != ':' {
		return 0, false
	}
	rest = bytes.TrimLeft(rest[1:], " \t\r\n")
	n, digits := 0, 0
	for _, c := range rest {
		if c < '0' || c > '9' || digits > 9 {
			break
		}
		n = n*10 + int(c-'0')
		digits++
	}
	if digits > 9 {
		return 0, false
	}
	return n, digits > 0
}

// CountEvents returns how many data events carrying a JSON object start in
// chunk, a piece of an event stream: streamed completions send one per
// token (vLLM, SGLang), so this counts output when usage is missing.
func CountEvents(chunk []byte) int { return bytes.Count(chunk, []byte("data: {")) }

// IsEventStream reports whether a response's content type is a
// server-sent event stream: a streamed completion, whose first bytes are
// its first token.
func IsEventStream(contentType string) bool {
	return strings.HasPrefix(strings.ToLower(contentType), "text/event-stream")
}

// IsJSON reports whether a content type is JSON (application/json, any
// +json type, with or without parameters).
func IsJSON(contentType string) bool {
	mt, _, _ := strings.Cut(contentType, ";")
	mt = strings.ToLower(strings.TrimSpace(mt))
	return mt == "application/json" || strings.HasSuffix(mt, "+json")
}
