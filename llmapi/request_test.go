package llmapi

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/tokenlb/tokenlb/tokenizer"
)

// The expected counts in this file were checked by hand against OpenAI's
// Python reference implementation (tiktoken 0.x) loaded with the same BPE
// files: len(get_encoding(name).encode(s, disallowed_special=())).

// counter parses request bodies and counts them with an encoding, within
// the tokenizer's default budget, as tokenlb does.
type counter struct{ tk *tokenizer.Tokenizer }

func newCounter(t testing.TB, encoding string) counter {
	t.Helper()
	tk, err := tokenizer.New(tokenizer.Options{Encoding: encoding})
	if err != nil {
		t.Fatalf("tokenizer.New(%q): %v", encoding, err)
	}
	return counter{tk}
}

func (c counter) parse(path string, body []byte) (Prompt, error) {
	return Parse(path, body, c.tk.Budget())
}

func TestParse(t *testing.T) {
	cl := newCounter(t, "cl100k_base")
	cases := []struct {
		name string
		path string
		body string
		want Prompt
	}{
		{
			name: "chat string content",
			path: "/v1/chat/completions",
			body: `{"model":"m1","stream":true,"max_tokens":64,"messages":[
				{"role":"system","content":"You are a helpful assistant."},
				{"role":"user","content":"Hello, world!"}]}`,
			// priming 3 + (3 + system 1 + 6) + (3 + user 1 + 4)
			want: Prompt{API: Chat, Model: "m1", Stream: true, MaxOutputTokens: 64, Tokens: 3 + 10 + 8},
		},
		{
			name: "chat parts, image and name",
			path: "/v1/chat/completions",
			body: `{"model":"m1","max_completion_tokens":10,"messages":[{"role":"user","name":"alice","content":[
				{"type":"text","text":"Describe this image."},
				{"type":"image_url","image_url":{"url":"https://example.invalid/cat.png"}}]}]}`,
			// 3 + (3 + user 1 + name (1 + alice 1) + text 4 + image 85)
			want: Prompt{API: Chat, Model: "m1", MaxOutputTokens: 10, Tokens: 3 + 3 + 1 + 2 + 4 + 85},
		},
		{
			name: "chat developer, tool calls, tool result, tool definitions",
			path: "/v1/chat/completions",
			body: `{"model":"m1","messages":[
				{"role":"developer","content":"Be terse."},
				{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},
				{"role":"tool","tool_call_id":"call_1","content":"22C"}],
				"tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}]}`,
			// 3 + (3+1+3) + (3 + assistant 1 + get_weather 2 + args 5) + (3 + tool 1 + call_1 3 + 22C 2) + tools JSON 29
			want: Prompt{API: Chat, Model: "m1", Tokens: 3 + 7 + 11 + 9 + 29},
		},
		{
			name: "chat multi-byte text",
			path: "/v1/chat/completions",
			body: `{"messages":[{"role":"user","content":"日本語のテキストです。"}]}`,
			want: Prompt{API: Chat, Tokens: 3 + 3 + 1 + 10},
		},
		{
			name: "gateway prefix and query string",
			path: "/openai/v1/chat/completions?api-version=1",
			body: `{"messages":[{"role":"user","content":"Hello, world!"}]}`,
			want: Prompt{API: Chat, Tokens: 3 + 3 + 1 + 4},
		},
		{
			name: "completions string",
			path: "/v1/completions",
			body: `{"model":"m2","prompt":"Once upon a time","max_tokens":5}`,
			want: Prompt{API: Completions, Model: "m2", MaxOutputTokens: 5, Tokens: 4},
		},
		{
			name: "completions list of strings",
			path: "/v1/completions",
			body: `{"prompt":["first","second","Once upon a time"]}`,
			want: Prompt{API: Completions, Tokens: 1 + 1 + 4},
		},
		{
			name: "completions token ids",
			path: "/v1/completions",
			body: `{"prompt":[101, 2023, 2003, 1037, 3231]}`,
			want: Prompt{API: Completions, Tokens: 5},
		},
		{
			name: "completions batches of token ids",
			path: "/v1/completions",
			body: `{"prompt":[[1,2,3],[4,5],[6]]}`,
			want: Prompt{API: Completions, Tokens: 6},
		},
		{
			name: "embeddings input string and list",
			path: "/v1/embeddings",
			body: `{"model":"e","input":["Hello, world!","bar baz"]}`,
			want: Prompt{API: Embeddings, Model: "e", Tokens: 4 + 2},
		},
		{
			name: "embeddings token ids",
			path: "/v1/embeddings",
			body: `{"input":[[7,8,9,10]]}`,
			want: Prompt{API: Embeddings, Tokens: 4},
		},
		{
			name: "responses string input and instructions",
			path: "/v1/responses",
			body: `{"model":"r","instructions":"Answer in French.","input":"Hello, world!","max_output_tokens":99}`,
			// 3 + (3 + 4) + (3 + 4)
			want: Prompt{API: Responses, Model: "r", MaxOutputTokens: 99, Tokens: 3 + 7 + 7},
		},
		{
			name: "responses items",
			path: "/v1/responses",
			body: `{"input":[
				{"role":"user","content":[{"type":"input_text","text":"Summarise the report."}]},
				{"type":"function_call","id":"fc_1","call_id":"call_9","name":"search","arguments":"{\"q\":\"weather\"}"},
				{"type":"function_call_output","call_id":"call_9","output":"sunny"}]}`,
			// 3 + (3 + user 1 + 6) + (3 + search 1 + args 5) + (3 + sunny 2)
			want: Prompt{API: Responses, Tokens: 3 + 10 + 9 + 5},
		},
		{
			name: "anthropic messages",
			path: "/v1/messages",
			body: `{"model":"claude","max_tokens":1024,"system":[{"type":"text","text":"Follow the rules."}],"messages":[
				{"role":"user","content":"Hello, world!"},
				{"role":"assistant","content":[{"type":"text","text":"Bonjour"},{"type":"tool_use","id":"tu_1","name":"search","input":{"q":"weather"}}]},
				{"role":"user","content":[{"type":"tool_result","tool_use_id":"tu_1","content":"sunny"}]}]}`,
			// 3 + system (3 + 4) + (3 + user 1 + 4) + (3 + assistant 1 + Bonjour 1 + search 1 + {"q":"weather"} 5) + (3 + user 1 + sunny 2)
			want: Prompt{API: Messages, Model: "claude", MaxOutputTokens: 1024, Tokens: 3 + 7 + 8 + 11 + 6},
		},
		{
			name: "anthropic string system",
			path: "/v1/messages",
			body: `{"system":"Always cite sources.","messages":[{"role":"user","content":"ok"}]}`,
			want: Prompt{API: Messages, Tokens: 3 + (3 + 4) + (3 + 1 + 1)},
		},
		{
			name: "lenient field types",
			path: "/v1/chat/completions",
			body: `{"model":"m","stream":"true","max_tokens":1e3,"messages":[{"role":"user","content":"ok"}]}`,
			want: Prompt{API: Chat, Model: "m", Stream: true, MaxOutputTokens: 1000, Tokens: 3 + 3 + 1 + 1},
		},
		{
			name: "tool arguments as an object",
			path: "/v1/chat/completions",
			body: `{"messages":[{"role":"assistant","tool_calls":[{"function":{"name":"search","arguments":{"q":"weather"}}}]}]}`,
			// 3 + (3 + assistant 1 + search 1 + {"q":"weather"} 5)
			want: Prompt{API: Chat, Tokens: 3 + 3 + 1 + 1 + 5},
		},
		{
			name: "responses instructions as items",
			path: "/v1/responses",
			body: `{"instructions":[{"type":"input_text","text":"Answer in French."}],"input":"ok"}`,
			want: Prompt{API: Responses, Tokens: 3 + (3 + 4) + (3 + 1)},
		},
		{
			name: "unexpected shape falls back to string values",
			path: "/v1/chat/completions",
			body: `{"messages":"ok","model":7}`,
			want: Prompt{API: Chat, Tokens: 1 + 1},
		},
		{
			name: "assistants messages path is not Anthropic",
			path: "/v1/threads/thread_1/messages",
			body: `{"role":"user","content":"ok"}`,
			want: Prompt{API: Other, Tokens: 1 + 1},
		},
		{
			name: "unknown path counts string values and numbers",
			path: "/v2/generate",
			body: `{"inputs":"bar baz","parameters":{"n":[1,2],"ok":true,"label":"ok"}}`,
			want: Prompt{API: Other, Tokens: 2 + 2 + 1},
		},
		{
			name: "unknown path without body",
			path: "/v1/models",
			body: ``,
			want: Prompt{API: Other},
		},
		{
			name: "unknown path with a body that is not JSON",
			path: "/v1/audio/transcriptions",
			body: "--boundary\r\nContent-Disposition: form-data",
			want: Prompt{API: Other},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := cl.parse(c.path, []byte(c.body))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if !reflect.DeepEqual(got, c.want) {
				t.Fatalf("Parse = %+v, want %+v", got, c.want)
			}
		})
	}
}

func TestParseO200k(t *testing.T) {
	o := newCounter(t, "o200k_base")
	got, err := o.parse("/v1/chat/completions", []byte(`{"messages":[{"role":"user","content":"👩‍💻 ships 🚀 code"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	if want := 3 + 3 + 1 + 9; got.Tokens != want {
		t.Fatalf("o200k tokens = %d, want %d", got.Tokens, want)
	}
}

func TestParseErrors(t *testing.T) {
	cl := newCounter(t, "cl100k_base")
	deep := strings.Repeat("[", MaxDepth+1) + strings.Repeat("]", MaxDepth+1)
	cases := []struct {
		name, path, body string
		want             error
	}{
		{"empty body", "/v1/chat/completions", "", ErrNoPrompt},
		{"not JSON", "/v1/chat/completions", "hello", ErrInvalidJSON},
		{"truncated JSON", "/v1/chat/completions", `{"messages":[{"role":"user"`, ErrInvalidJSON},
		{"two values", "/v1/completions", `{"prompt":"a"} {"prompt":"b"}`, ErrInvalidJSON},
		{"no messages", "/v1/chat/completions", `{"model":"m"}`, ErrNoPrompt},
		{"empty messages", "/v1/messages", `{"messages":[]}`, ErrNoPrompt},
		{"no prompt", "/v1/completions", `{"model":"m"}`, ErrNoPrompt},
		{"numeric prompt", "/v1/completions", `{"prompt":42}`, ErrNoPrompt},
		{"no input", "/v1/embeddings", `{"input":null}`, ErrNoPrompt},
		{"no responses input", "/v1/responses", `{"model":"m"}`, ErrNoPrompt},
		{"content is a number", "/v1/chat/completions", `{"messages":[{"role":"user","content":5}]}`, ErrNoPrompt},
		{"too deep", "/v1/completions", `{"prompt":` + deep + `}`, ErrTooDeep},
		{"an array", "/v1/chat/completions", `[{"role":"user","content":"hi"}]`, ErrNotObject},
		{"an empty array", "/v1/completions", ` [] `, ErrNotObject},
		{"a number", "/v1/embeddings", `123`, ErrNotObject},
		{"a string", "/v1/messages", `"text"`, ErrNotObject},
		{"null", "/v1/responses", "\nnull", ErrNotObject},
		{"true", "/v1/chat/completions", `true`, ErrNotObject},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := cl.parse(c.path, []byte(c.body))
			if !errors.Is(err, c.want) {
				t.Fatalf("error = %v, want %v", err, c.want)
			}
		})
	}
}

// TestHostileBodies feeds bodies that break naive parsers: they must be
// rejected or counted without exhausting the stack or memory.
func TestHostileBodies(t *testing.T) {
	cl := newCounter(t, "cl100k_base")
	const n = 4 << 20
	bodies := map[string]string{
		"a million open brackets":       strings.Repeat("[", n),
		"deep objects on an other path": strings.Repeat(`{"a":`, n/5),
		// One pre-tokenizer piece of 256 KiB: quadratic merging without chunking.
		"brackets inside a string": `{"prompt":"` + strings.Repeat("[", n/16) + `"}`,
		"huge token-id array":      `{"prompt":[` + strings.Repeat("1,", n/2) + `1]}`,
	}
	for name, body := range bodies {
		t.Run(name, func(t *testing.T) {
			_, errAPI := cl.parse("/v1/completions", []byte(body))
			p, errOther := cl.parse("/v2/anything", []byte(body))
			if errOther != nil {
				t.Fatalf("other path: %v", errOther)
			}
			if strings.HasPrefix(body, "[[") || strings.HasPrefix(body, `{"a":{`) {
				// Too deep: refused on an API path, zero cost elsewhere.
				if !errors.Is(errAPI, ErrTooDeep) || p.Tokens != 0 {
					t.Fatalf("too deep: API error %v, other path %d tokens", errAPI, p.Tokens)
				}
			}
		})
	}
	// The string of brackets is ordinary text and must be counted, not rejected.
	if _, err := cl.parse("/v1/completions", []byte(bodies["brackets inside a string"])); err != nil {
		t.Fatalf("brackets inside a string: %v", err)
	}
	p, err := cl.parse("/v1/completions", []byte(bodies["huge token-id array"]))
	if err != nil || p.Tokens != n/2+1 {
		t.Fatalf("huge token-id array = %d, %v; want %d", p.Tokens, err, n/2+1)
	}
}

func TestAPIFor(t *testing.T) {
	cases := map[string]API{
		"/v1/chat/completions":  Chat,
		"/v1/chat/completions/": Chat,
		"/v1/completions":       Completions,
		"/v1/embeddings?x=1":    Embeddings,
		"/v1/responses":         Responses,
		"/v1/messages":          Messages,
		"/v1/models":            Other,
		"/":                     Other,
		"/v1/responses/resp_1":  Other,
	}
	for path, want := range cases {
		if got := APIFor(path); got != want {
			t.Errorf("APIFor(%q) = %q, want %q", path, got, want)
		}
	}
}

// FuzzJSONString: jsonString decodes every valid JSON string literal as
// json.Unmarshal does, escapes, \u sequences and invalid UTF-8 included.
func FuzzJSONString(f *testing.F) {
	for _, s := range []string{`"plain"`, `"a\nb\t\"c\"\\d\/e"`, `"\u00e9\ud83d\ude00"`, `"\ud800"`, "\"\xff\xfe\"", `"日本語\r\n"`, `""`, `"\\"`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		var want string
		if err := json.Unmarshal(raw, &want); err != nil {
			return // jsonString is only given valid literals
		}
		got, err := jsonString(raw)
		if err != nil || got != want {
			t.Fatalf("jsonString(%q) = %q, %v; json.Unmarshal gives %q", raw, got, err, want)
		}
	})
}

// depthByStates is checkDepth as a plain state machine over every byte:
// the definition checkDepth's fast paths must agree with.
func depthByStates(body []byte) error {
	depth, inString, escaped := 0, false, false
	for _, c := range body {
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
		case c == '{' || c == '[':
			depth++
			if depth > MaxDepth {
				return ErrTooDeep
			}
		case c == '}' || c == ']':
			depth--
		}
	}
	return nil
}

// FuzzCheckDepth: checkDepth says what a byte-by-byte state machine says,
// on any input, JSON or not: brackets inside strings, escaped quotes and
// runs of backslashes do not count.
func FuzzCheckDepth(f *testing.F) {
	deep := strings.Repeat("[", MaxDepth+1)
	for _, s := range []string{deep, `["` + deep + `"]`, `["\"` + deep + `"]`, `["\\"` + deep + `]`, `"\\\"` + deep,
		`{"a":"` + strings.Repeat(`\\`, 7) + `"` + deep, `"` + deep, strings.Repeat("{}", MaxDepth+5), `[]`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		// Runs of brackets the fuzzer can reach with short inputs.
		for _, b := range [][]byte{body, bytes.Repeat(body, MaxDepth/4+1)} {
			if got, want := checkDepth(b), depthByStates(b); got != want {
				t.Fatalf("checkDepth(%q) = %v, want %v", b, got, want)
			}
		}
	})
}
