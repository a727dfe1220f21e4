package route

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/tokenlb/tokenlb/prefix"
	"github.com/tokenlb/tokenlb/tokenizer"
)

// chatBody returns a chat request whose user message is text.
func chatBody(t testing.TB, system, text string) []byte {
	t.Helper()
	b, err := json.Marshal(map[string]any{"model": "m", "messages": []map[string]string{
		{"role": "system", "content": system}, {"role": "user", "content": text}}})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func newRouter(t testing.TB, tk tokenizer.Options, h prefix.Hashing) *Router {
	t.Helper()
	tok, err := tokenizer.New(tk)
	if err != nil {
		t.Fatal(err)
	}
	return New(Config{Tokenizer: tok, Prefix: h})
}

// TestCountBody: counting a body hashes its prompt's leading blocks in the
// same pass, and says how long its texts are and its blocks; with prefix
// hashing off, nothing is hashed.
func TestCountBody(t *testing.T) {
	rt := newRouter(t, tokenizer.Options{}, prefix.Hashing{Blocks: 8, BlockBytes: 64})
	doc := "the same long document, the same long document, the same long document, "
	p, err := rt.countBody("/v1/chat/completions", chatBody(t, doc, "q"))
	if err != nil {
		t.Fatal(err)
	}
	if want := len("system") + len(doc) + len("user") + len("q"); p.TextBytes != want || p.BlockBytes != 64 || len(p.Prefix) != 1 {
		t.Fatalf("TextBytes %d, BlockBytes %d, %d blocks; want %d, 64 and 1", p.TextBytes, p.BlockBytes, len(p.Prefix), want)
	}
	if p.Tokens == 0 || p.Model != "m" {
		t.Fatalf("counted %+v", p)
	}
	off := newRouter(t, tokenizer.Options{}, prefix.Hashing{})
	if p, _ := off.countBody("/v1/chat/completions", chatBody(t, doc, "q")); p.Prefix != nil || p.BlockBytes != 0 {
		t.Fatalf("hashed %d blocks with prefix hashing off", len(p.Prefix))
	}
}

// BenchmarkCountBody counts a chat request body whole, JSON decoding
// included, with the cache off and on (every body after the first is a hit
// for its long texts).
func BenchmarkCountBody(b *testing.B) {
	raw, err := os.ReadFile(filepath.Join("..", "tokenizer", "testdata", "corpus", "chat.json"))
	if err != nil {
		b.Fatal(err)
	}
	for _, cached := range []bool{false, true} {
		opts := tokenizer.Options{CacheEntries: -1}
		name := "cache=off"
		if cached {
			opts.CacheEntries, name = 0, "cache=on"
		}
		rt := newRouter(b, opts, prefix.Hashing{})
		b.Run(name, func(b *testing.B) {
			b.SetBytes(int64(len(raw)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := rt.countBody("/v1/chat/completions", raw); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
