// Package llmapi knows what the LLM HTTP APIs look like, in both
// directions, and nothing of counting or routing: which API a path names
// (APIFor), the request shapes of OpenAI's chat completions, completions,
// embeddings and responses APIs and Anthropic's messages API (Parse), the
// usage a response reports (ParseUsage), event-stream framing, and the
// OpenAI error shape (Error).
package llmapi

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"unicode/utf8"
)

// API names the request shape a path carries.
type API string

// The request shapes tokenlb understands. Other is any other path: its JSON
// body, if any, is counted by its string values.
const (
	Chat        API = "chat_completions"
	Completions API = "completions"
	Embeddings  API = "embeddings"
	Responses   API = "responses"
	Messages    API = "messages" // Anthropic
	Other       API = "other"
)

// Overheads added to the text of chat-style requests. They follow the
// accounting OpenAI publishes for its chat models: every message is wrapped in
// a few template tokens, a name costs one more, and the reply is primed with
// three. ImageTokens is the cost of a low-detail image.
const (
	MessageOverhead = 3
	NameOverhead    = 1
	ReplyPriming    = 3
	ImageTokens     = 85
)

// MaxDepth bounds how deeply a request body may nest JSON arrays and objects.
const MaxDepth = 128

// Errors returned by Parse; wrap-checked with errors.Is.
var (
	ErrInvalidJSON = errors.New("request body is not valid JSON")
	ErrTooDeep     = fmt.Errorf("request body nests JSON deeper than %d levels", MaxDepth)
	ErrNoPrompt    = errors.New("request body has nothing to count")
	ErrNotObject   = errors.New("request body is not a JSON object")
)

// Prompt is what a request body says of the prompt and its answer.
type Prompt struct {
	API    API
	Model  string
	Stream bool
	// MaxOutputTokens is max_tokens, max_completion_tokens or
	// max_output_tokens, whichever the request set; 0 when none.
	MaxOutputTokens int
	// Tokens is the prompt's token count by the Counter Parse was given,
	// template overheads included.
	Tokens int
}

// Counter counts the tokens of one text of a request. Parse calls it for
// each text in the order the request lists them (for chat: each message's
// role and content in turn, then tool definitions), so that a counter may
// also hash the prompt's leading text on the way.
type Counter interface {
	Count(text string) int
}

// APIFor returns the request shape served at path (query string ignored).
// Matching is on the path's end so that gateway prefixes such as
// /openai/v1/chat/completions work too.
func APIFor(path string) API {
	if i := strings.IndexAny(path, "?#"); i >= 0 {
		path = path[:i]
	}
	path = strings.TrimRight(path, "/")
	switch {
	case strings.HasSuffix(path, "/chat/completions"):
		return Chat
	case strings.HasSuffix(path, "/completions"):
		return Completions
	case strings.HasSuffix(path, "/embeddings"):
		return Embeddings
	case strings.HasSuffix(path, "/responses"):
		return Responses
	case strings.HasSuffix(path, "/v1/messages"):
		// Anthropic's path; not /v1/threads/{id}/messages (Assistants).
		return Messages
	}
	return Other
}

// request holds the fields of every supported shape; each API reads its own.
type request struct {
	Model               flexString      `json:"model"`
	Stream              flexBool        `json:"stream"`
	MaxTokens           flexInt         `json:"max_tokens"`
	MaxCompletionTokens flexInt         `json:"max_completion_tokens"`
	MaxOutputTokens     flexInt         `json:"max_output_tokens"`
	Messages            []message       `json:"messages"`
	Tools               json.RawMessage `json:"tools"`
	Functions           json.RawMessage `json:"functions"`
	Prompt              json.RawMessage `json:"prompt"`
	Input               json.RawMessage `json:"input"`
	Instructions        json.RawMessage `json:"instructions"`
	System              json.RawMessage `json:"system"`
}

type message struct {
	Role       string          `json:"role"`
	Name       string          `json:"name"`
	Content    json.RawMessage `json:"content"`
	ToolCalls  []toolCall      `json:"tool_calls"`
	ToolCallID string          `json:"tool_call_id"`
	Refusal    string          `json:"refusal"`
	Reasoning  string          `json:"reasoning_content"`
}

type toolCall struct {
	Function struct {
		Name      string          `json:"name"`
		Arguments json.RawMessage `json:"arguments"`
	} `json:"function"`
}

// Parse reads body as the request shape for path and counts its prompt
// tokens with c. On API paths an empty body is ErrNoPrompt, a body that is
// not JSON is ErrInvalidJSON and one nesting deeper than MaxDepth is
// ErrTooDeep. On Other paths the string values of a JSON body are counted
// and any other body costs zero: the backend judges requests tokenlb does
// not model.
func Parse(path string, body []byte, c Counter) (Prompt, error) {
	t := walker{c}
	p := Prompt{API: APIFor(path)}
	if len(bytes.TrimSpace(body)) == 0 {
		if p.API == Other {
			return p, nil
		}
		return p, ErrNoPrompt
	}
	if p.API == Other {
		if checkDepth(body) != nil || !json.Valid(body) {
			// Not ours to judge: the backend answers for paths tokenlb does
			// not model. The request is routed at zero cost.
			return p, nil
		}
		n, err := t.countJSON(body, nil)
		p.Tokens = n
		return p, err
	}
	if err := checkDepth(body); err != nil {
		return p, err
	}
	// Unmarshal checks the whole body is valid JSON before decoding it.
	var r request
	err := json.Unmarshal(body, &r)
	var syntax *json.SyntaxError
	if errors.As(err, &syntax) {
		return p, fmt.Errorf("%w: %v", ErrInvalidJSON, err)
	}
	if b := bytes.TrimLeft(body, " \t\r\n"); b[0] != '{' {
		// Valid JSON, but an array, a string, a number or null: no API
		// tokenlb knows takes one, and a backend would refuse it too.
		return p, fmt.Errorf("%w: it starts with %q", ErrNotObject, b[0])
	}
	if err != nil {
		// Valid JSON of an unexpected shape (a field of another type than
		// the API documents): count its string values rather than refuse.
		n, err := t.countJSON(body, skipStructural)
		p.Tokens = n
		return p, err
	}
	p.Model, p.Stream = string(r.Model), bool(r.Stream)
	p.MaxOutputTokens = firstPositive(int(r.MaxCompletionTokens), int(r.MaxTokens), int(r.MaxOutputTokens))

	switch p.API {
	case Chat:
		p.Tokens, err = t.countChat(&r)
	case Completions:
		p.Tokens, err = t.countInput(r.Prompt)
	case Embeddings:
		p.Tokens, err = t.countInput(r.Input)
	case Responses:
		p.Tokens, err = t.countResponses(&r)
	case Messages:
		p.Tokens, err = t.countAnthropic(&r)
	}
	return p, err
}

// walker walks one request body, counting each text it finds.
type walker struct{ c Counter }

// text counts one text.
func (t walker) text(s string) int {
	if s == "" {
		return 0
	}
	return t.c.Count(s)
}

func firstPositive(vs ...int) int {
	for _, v := range vs {
		if v > 0 {
			return v
		}
	}
	return 0
}

func (t walker) countChat(r *request) (int, error) {
	if len(r.Messages) == 0 {
		return 0, fmt.Errorf("%w: \"messages\" is missing or empty", ErrNoPrompt)
	}
	n := ReplyPriming
	for _, m := range r.Messages {
		n += MessageOverhead + t.text(m.Role) + t.text(m.ToolCallID) + t.text(m.Refusal) + t.text(m.Reasoning)
		if m.Name != "" {
			n += NameOverhead + t.text(m.Name)
		}
		c, err := t.countContent(m.Content)
		if err != nil {
			return 0, err
		}
		n += c
		for _, tc := range m.ToolCalls {
			args, err := t.countContent(tc.Function.Arguments)
			if err != nil {
				return 0, err
			}
			n += t.text(tc.Function.Name) + args
		}
	}
	tools, err := t.countCompact(r.Tools, r.Functions)
	return n + tools, err
}

func (t walker) countResponses(r *request) (int, error) {
	if isNull(r.Input) && isNull(r.Instructions) {
		return 0, fmt.Errorf("%w: \"input\" is missing", ErrNoPrompt)
	}
	n := ReplyPriming
	if !isNull(r.Instructions) {
		c, err := t.countJSON(r.Instructions, skipStructural)
		if err != nil {
			return 0, err
		}
		n += MessageOverhead + c
	}
	switch kind(r.Input) {
	case 0:
	case '"':
		s, err := jsonString(r.Input)
		if err != nil {
			return 0, fmt.Errorf("%w: input: %v", ErrInvalidJSON, err)
		}
		n += MessageOverhead + t.text(s)
	case '[':
		var items []json.RawMessage
		if err := json.Unmarshal(r.Input, &items); err != nil {
			return 0, fmt.Errorf("%w: input: %v", ErrInvalidJSON, err)
		}
		for _, it := range items {
			var m message
			if kind(it) == '{' {
				if err := json.Unmarshal(it, &m); err != nil {
					return 0, fmt.Errorf("%w: input item: %v", ErrInvalidJSON, err)
				}
			}
			if m.Role != "" {
				c, err := t.countContent(m.Content)
				if err != nil {
					return 0, err
				}
				n += MessageOverhead + t.text(m.Role) + c
				continue
			}
			// function_call, function_call_output, reasoning and other items.
			c, err := t.countJSON(it, skipStructural)
			if err != nil {
				return 0, err
			}
			n += MessageOverhead + c
		}
	default:
		return 0, fmt.Errorf("%w: \"input\" must be a string or an array", ErrNoPrompt)
	}
	tools, err := t.countCompact(r.Tools)
	return n + tools, err
}

func (t walker) countAnthropic(r *request) (int, error) {
	if len(r.Messages) == 0 {
		return 0, fmt.Errorf("%w: \"messages\" is missing or empty", ErrNoPrompt)
	}
	n := ReplyPriming
	if !isNull(r.System) {
		c, err := t.countContent(r.System)
		if err != nil {
			return 0, err
		}
		n += MessageOverhead + c
	}
	for _, m := range r.Messages {
		c, err := t.countContent(m.Content)
		if err != nil {
			return 0, err
		}
		n += MessageOverhead + t.text(m.Role) + c
	}
	tools, err := t.countCompact(r.Tools)
	return n + tools, err
}

// part is one element of a content array, in OpenAI's or Anthropic's form.
type part struct {
	Type    string          `json:"type"`
	Text    *string         `json:"text"`
	Name    string          `json:"name"`    // Anthropic tool_use
	Input   json.RawMessage `json:"input"`   // Anthropic tool_use
	Content json.RawMessage `json:"content"` // Anthropic tool_result
}

// countContent counts a message's content: a string, null, or an array of
// parts (text, images, tool use and tool results).
func (t walker) countContent(raw json.RawMessage) (int, error) {
	switch kind(raw) {
	case 0:
		return 0, nil
	case '"':
		s, err := jsonString(raw)
		if err != nil {
			return 0, fmt.Errorf("%w: content: %v", ErrInvalidJSON, err)
		}
		return t.text(s), nil
	case '[':
	case '{':
		// A JSON object where text was expected (tool arguments sent as an
		// object, say): the compact JSON a template would render.
		return t.countCompact(raw)
	default:
		return 0, fmt.Errorf("%w: content must be a string or an array of parts", ErrNoPrompt)
	}
	var parts []json.RawMessage
	if err := json.Unmarshal(raw, &parts); err != nil {
		return 0, fmt.Errorf("%w: content: %v", ErrInvalidJSON, err)
	}
	n := 0
	for _, pr := range parts {
		var p part
		if kind(pr) == '{' {
			if err := json.Unmarshal(pr, &p); err != nil {
				return 0, fmt.Errorf("%w: content part: %v", ErrInvalidJSON, err)
			}
		}
		switch {
		case p.Text != nil:
			n += t.text(*p.Text)
		case p.Type == "image_url" || p.Type == "image" || p.Type == "input_image":
			n += ImageTokens
		case p.Type == "tool_use":
			c, err := t.countCompact(p.Input)
			if err != nil {
				return 0, err
			}
			n += t.text(p.Name) + c
		case p.Type == "tool_result":
			c, err := t.countContent(p.Content)
			if err != nil {
				return 0, err
			}
			n += c
		default:
			c, err := t.countJSON(pr, skipStructural)
			if err != nil {
				return 0, err
			}
			n += c
		}
	}
	return n, nil
}

// countInput counts a completions prompt or an embeddings input: a string, an
// array of strings, an array of token ids, or an array of token-id arrays.
// Token ids are counted as they are: one id, one token.
func (t walker) countInput(raw json.RawMessage) (int, error) {
	switch kind(raw) {
	case 0:
		return 0, fmt.Errorf("%w: the prompt or input is missing", ErrNoPrompt)
	case '"', '[':
	default:
		return 0, fmt.Errorf("%w: the prompt or input must be a string or an array", ErrNoPrompt)
	}
	return t.countJSON(raw, nil)
}

// countCompact counts JSON values (tool definitions, tool inputs) as the
// compact JSON text a chat template renders them into.
func (t walker) countCompact(raws ...json.RawMessage) (int, error) {
	n := 0
	var buf bytes.Buffer
	for _, raw := range raws {
		if isNull(raw) {
			continue
		}
		buf.Reset()
		if err := json.Compact(&buf, raw); err != nil {
			return 0, fmt.Errorf("%w: %v", ErrInvalidJSON, err)
		}
		n += t.text(buf.String())
	}
	return n, nil
}

// skipStructural reports the keys whose string values are identifiers and
// markers, not text a model reads.
func skipStructural(key string) bool {
	switch key {
	case "type", "id", "call_id", "status", "role":
		return true
	}
	return false
}

// countJSON walks a JSON value without building it in memory and counts its
// string values (object keys excluded, and values under keys for which skip
// reports true) plus one token per number, so that token-id arrays count as
// their length. The value must already be valid JSON.
func (t walker) countJSON(raw []byte, skip func(string) bool) (int, error) {
	type frame struct{ object, wantKey bool }
	var stack []frame
	valueDone := func() {
		if top := len(stack) - 1; top >= 0 && stack[top].object {
			stack[top].wantKey = true
		}
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	skipNext := false
	n := 0
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return 0, fmt.Errorf("%w: %v", ErrInvalidJSON, err)
		}
		if top := len(stack) - 1; top >= 0 && stack[top].wantKey {
			if key, ok := tok.(string); ok {
				skipNext = skip != nil && skip(key)
				stack[top].wantKey = false
				continue
			}
			// The only other token possible here is the closing '}'.
		}
		switch v := tok.(type) {
		case json.Delim:
			switch v {
			case '{':
				stack = append(stack, frame{object: true, wantKey: true})
			case '[':
				stack = append(stack, frame{})
			default:
				stack = stack[:len(stack)-1]
				valueDone()
			}
		case string:
			if !skipNext {
				n += t.text(v)
			}
			valueDone()
		case json.Number:
			n++
			valueDone()
		default: // bool, null
			valueDone()
		}
		skipNext = false
	}
}

// kind returns the first byte of a JSON value ('"', '[', '{', a digit, 't',
// 'f'), or 0 when the value is absent or null.
func kind(raw json.RawMessage) byte {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || raw[0] == 'n' {
		return 0
	}
	return raw[0]
}

func isNull(raw json.RawMessage) bool { return kind(raw) == 0 }

// checkDepth rejects bodies nesting deeper than MaxDepth before any decoder
// sees them, so that a hostile body costs one linear scan and no memory.
// A body with no more than MaxDepth brackets cannot nest deeper (most
// bodies: two counts of one byte, which are fast); otherwise the scan
// skips each string to its closing quote, the one preceded by an even
// number of backslashes.
func checkDepth(body []byte) error {
	if bytes.Count(body, []byte{'{'})+bytes.Count(body, []byte{'['}) <= MaxDepth {
		return nil
	}
	depth := 0
	for i := 0; i < len(body); i++ {
		switch body[i] {
		case '"':
			end := closingQuote(body, i)
			if end < 0 {
				return nil // never closed: not JSON, which the decoder says
			}
			i = end
		case '{', '[':
			depth++
			if depth > MaxDepth {
				return ErrTooDeep
			}
		case '}', ']':
			depth--
		}
	}
	return nil
}

// closingQuote returns the index of the quote that closes the string
// opening at body[open], or -1 when none does.
func closingQuote(body []byte, open int) int {
	for j := open + 1; ; j++ {
		k := bytes.IndexByte(body[j:], '"')
		if k < 0 {
			return -1
		}
		j += k
		backslashes := 0
		for m := j - 1; m > open && body[m] == '\\'; m-- {
			backslashes++
		}
		if backslashes%2 == 0 {
			return j
		}
	}
}

// flexString, flexBool and flexInt read the request fields tokenlb only
// notes (model, stream, max_tokens) without failing on an unexpected type:
// a number given as 1e3 or "512", a stream flag given as "true". What cannot
// be read is left at zero.
type (
	flexString string
	flexBool   bool
	flexInt    int
)

func (f *flexString) UnmarshalJSON(b []byte) error {
	var s string
	if json.Unmarshal(b, &s) == nil {
		*f = flexString(s)
	}
	return nil
}

func (f *flexBool) UnmarshalJSON(b []byte) error {
	var v any
	json.Unmarshal(b, &v)
	switch x := v.(type) {
	case bool:
		*f = flexBool(x)
	case string:
		*f = flexBool(strings.EqualFold(x, "true"))
	}
	return nil
}

func (f *flexInt) UnmarshalJSON(b []byte) error {
	b = bytes.Trim(b, `"`)
	if v, err := strconv.ParseFloat(string(b), 64); err == nil && v > 0 && v < 1<<31 {
		*f = flexInt(v)
	}
	return nil
}

// jsonString decodes raw, a JSON string literal inside a body that
// json.Unmarshal has already validated, without validating it again: the
// common escapes are decoded here; a \u escape or bytes that are not UTF-8
// (which encoding/json turns into U+FFFD) go through json.Unmarshal, so the
// result is always what it would give.
func jsonString(raw []byte) (string, error) {
	slow := func() (string, error) {
		var s string
		err := json.Unmarshal(raw, &s)
		return s, err
	}
	if len(raw) < 2 || raw[0] != '"' || raw[len(raw)-1] != '"' {
		return slow()
	}
	in := raw[1 : len(raw)-1]
	if !utf8.Valid(in) {
		return slow()
	}
	i := bytes.IndexByte(in, '\\')
	if i < 0 {
		return string(in), nil
	}
	out := make([]byte, 0, len(in))
	for i >= 0 {
		out = append(out, in[:i]...)
		if i+1 >= len(in) {
			return slow()
		}
		switch c := in[i+1]; c {
		case '"', '\\', '/':
			out = append(out, c)
		case 'n':
			out = append(out, '\n')
		case 't':
			out = append(out, '\t')
		case 'r':
			out = append(out, '\r')
		case 'b':
			out = append(out, '\b')
		case 'f':
			out = append(out, '\f')
		default: // \u, or not valid JSON
			return slow()
		}
		in = in[i+2:]
		i = bytes.IndexByte(in, '\\')
	}
	return string(append(out, in...)), nil
}
