package llmapi

import (
	"os"
	"path/filepath"
	"testing"
)

// nothing is a Counter that counts nothing: Parse's own work alone.
type nothing struct{}

func (nothing) Count(string) int { return 0 }

// BenchmarkParse decodes a chat request body (the tokenizer corpus's 23 KB
// conversation) without counting it: what Parse costs before the counter.
//
//	go test -run '^$' -bench BenchmarkParse -count 6 ./llmapi/
func BenchmarkParse(b *testing.B) {
	body, err := os.ReadFile(filepath.Join("..", "tokenizer", "testdata", "corpus", "chat.json"))
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Parse("/v1/chat/completions", body, nothing{}); err != nil {
			b.Fatal(err)
		}
	}
}
