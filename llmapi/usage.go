package llmapi

import (
	"bytes"
	"strings"
)

// Usage is what a response reports of the tokens it took.
type Usage struct {
	PromptTokens, CompletionTokens int
	// CachedTokens are the prompt tokens the server's prefix cache held
	// (prompt_tokens_details.cached_tokens, as vLLM reports it); -1 when
	// the response does not say.
	CachedTokens int
}

// ParseUsage finds the last usage object in the end of a response body (a
// JSON response, or an event stream's final usage chunk) and reads its
// prompt, completion and cached tokens. It scans bytes rather than parsing
// JSON: it sees only the body's tail, which may be cut anywhere.
func ParseUsage(tail []byte) (Usage, bool) {
	i := bytes.LastIndex(tail, []byte(`"usage"`))
	if i < 0 {
		return Usage{}, false
	}
	obj := object(tail[i+len(`"usage"`):])
	p, okP := intField(obj, `"prompt_tokens"`)
	c, okC := intField(obj, `"completion_tokens"`)
	if !okP || !okC {
		return Usage{}, false
	}
	u := Usage{PromptTokens: p, CompletionTokens: c, CachedTokens: -1}
	if n, ok := intField(obj, `"cached_tokens"`); ok {
		u.CachedTokens = n
	}
	return u, true
}

// object returns the JSON object that b starts with (after spaces and a
// colon), nested objects included, or as much of it as b holds when it is
// cut off; nil when b does not start with one.
func object(b []byte) []byte {
	b = bytes.TrimLeft(b, " \t\r\n")
	if len(b) == 0 || b[0] != ':' {
		return nil
	}
	b = bytes.TrimLeft(b[1:], " \t\r\n")
	if len(b) == 0 || b[0] != '{' {
		return nil
	}
	depth, inString, escaped := 0, false, false
	for i, c := range b {
		switch {
		case inString:
			switch {
			case escaped:
				escaped = false
			case c == '\\':
				escaped = true
			case c == '"':
				inString = false
			}
		case c == '"':
			inString = true
		case c == '{':
			depth++
		case c == '}':
			depth--
			if depth == 0 {
				return b[:i+1]
			}
		}
	}
	return b
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
