package llmapi

import "testing"

func TestParseUsage(t *testing.T) {
	for _, tc := range []struct {
		name, tail string
		want       Usage
		ok         bool
	}{
		{"json body", `{"choices":[{"text":"x"}],"usage":{"prompt_tokens":12,"total_tokens":19,"completion_tokens":7}}`,
			Usage{PromptTokens: 12, CompletionTokens: 7, CachedTokens: -1}, true},
		{"sse usage chunk", "data: {\"choices\":[]}\n\ndata: {\"choices\":[],\"usage\": {\"prompt_tokens\" : 300, \"completion_tokens\":\n45}}\n\ndata: [DONE]\n\n",
			Usage{PromptTokens: 300, CompletionTokens: 45, CachedTokens: -1}, true},
		{"last usage wins", `{"usage":{"prompt_tokens":1,"completion_tokens":1}} {"usage":{"prompt_tokens":2,"completion_tokens":3}}`,
			Usage{PromptTokens: 2, CompletionTokens: 3, CachedTokens: -1}, true},
		{"no usage", "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n", Usage{}, false},
		{"usage null", `{"usage":null}`, Usage{}, false},
		{"cut off", `{"usage":{"prompt_tokens":12,"compl`, Usage{}, false},
		{"negative", `{"usage":{"prompt_tokens":-3,"completion_tokens":4}}`, Usage{}, false},
		{"overflowing", `{"usage":{"prompt_tokens":99999999999999999999,"completion_tokens":4}}`, Usage{}, false},
		{"fields of another object", `{"usage":{},"x":{"prompt_tokens":1,"completion_tokens":2}}`, Usage{}, false},
		{"cached tokens (vLLM)", `{"usage":{"prompt_tokens":900,"total_tokens":930,"completion_tokens":30,"prompt_tokens_details":{"cached_tokens":768}}}`,
			Usage{PromptTokens: 900, CompletionTokens: 30, CachedTokens: 768}, true},
		{"details first", `data: {"usage":{"prompt_tokens_details":{"cached_tokens":16},"completion_tokens_details":{"reasoning_tokens":0},"prompt_tokens":40,"completion_tokens":5}}`,
			Usage{PromptTokens: 40, CompletionTokens: 5, CachedTokens: 16}, true},
		{"details null", `{"usage":{"prompt_tokens":7,"completion_tokens":2,"prompt_tokens_details":null},"x":{"cached_tokens":3}}`,
			Usage{PromptTokens: 7, CompletionTokens: 2, CachedTokens: -1}, true},
		{"braces in a string", `{"usage":{"prompt_tokens":7,"completion_tokens":2,"note":"}{"},"x":{"cached_tokens":3}}`,
			Usage{PromptTokens: 7, CompletionTokens: 2, CachedTokens: -1}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := ParseUsage([]byte(tc.tail))
			if got != tc.want || ok != tc.ok {
				t.Fatalf("ParseUsage = %+v, %v; want %+v, %v", got, ok, tc.want, tc.ok)
			}
		})
	}
}
