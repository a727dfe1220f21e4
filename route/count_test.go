package route

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tokenlb/tokenlb/llmapi"
	"github.com/tokenlb/tokenlb/prefix"
	"github.com/tokenlb/tokenlb/processor"
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

// largeText is about n bytes of the tokenizer corpus's prose, code and
// mixed text, in turn: a long document pasted into a prompt.
func largeText(t testing.TB, n int) string {
	t.Helper()
	var parts []string
	for _, f := range []string{"prose.md", "code.go.txt", "mixed.txt", "cjk.txt"} {
		b, err := os.ReadFile(filepath.Join("..", "tokenizer", "testdata", "corpus", f))
		if err != nil {
			t.Fatal(err)
		}
		parts = append(parts, string(b))
	}
	var sb strings.Builder
	for i := 0; sb.Len() < n; i++ {
		sb.WriteString(parts[i%len(parts)])
	}
	return sb.String()[:n]
}

// TestLargePromptUnderTimeLimit: an 820 KB prompt whose exact count the
// time limit cuts short is estimated from parts of its own text counted
// exactly, within 3% of its exact count, whatever share of it the clock
// let through (the decoding of the body is not on that clock).
func TestLargePromptUnderTimeLimit(t *testing.T) {
	body := chatBody(t, "You are a helpful assistant.", largeText(t, 820<<10))
	exact, err := newRouter(t, tokenizer.Options{CacheEntries: -1, TimeLimit: time.Hour}, prefix.Hashing{}).countBody("/v1/chat/completions", body)
	if err != nil {
		t.Fatal(err)
	}
	for _, limit := range []time.Duration{time.Microsecond, time.Millisecond, 5 * time.Millisecond} {
		tok, err := tokenizer.New(tokenizer.Options{CacheEntries: -1, TimeLimit: limit})
		if err != nil {
			t.Fatal(err)
		}
		p, err := New(Config{Tokenizer: tok}).countBody("/v1/chat/completions", body)
		if err != nil {
			t.Fatal(err)
		}
		if limit == time.Microsecond && tok.Stats().EstimatedTime == 0 {
			t.Fatal("an 820 KB prompt was counted whole within 1µs: the time limit did not apply")
		}
		if e := math.Abs(float64(p.Tokens-exact.Tokens)) / float64(exact.Tokens); e > 0.03 {
			t.Fatalf("time limit %v: %d tokens estimated, %d exact: %.1f%% off, want within 3%%", limit, p.Tokens, exact.Tokens, 100*e)
		}
	}
}

// BenchmarkCountLargePrompt counts chat bodies of about 4k, 32k and 200k
// tokens whole (decoding included), with no time limit: what tokenlb adds
// to a large prompt before it can route it.
func BenchmarkCountLargePrompt(b *testing.B) {
	for _, kb := range []int{16, 128, 800} {
		body := chatBody(b, "You are a helpful assistant.", largeText(b, kb<<10))
		rt := newRouter(b, tokenizer.Options{CacheEntries: -1, TimeLimit: time.Hour}, prefix.Hashing{Blocks: 16, BlockBytes: 256})
		p, err := rt.countBody("/v1/chat/completions", body)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(fmt.Sprintf("tokens=%dk", p.Tokens/1000), func(b *testing.B) {
			b.SetBytes(int64(len(body)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := rt.countBody("/v1/chat/completions", body); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestReasons: every rejection the Router makes has its reason in Reasons,
// so that its series exists from the start.
func TestReasons(t *testing.T) {
	for _, r := range []*processor.Rejection{
		errPrompt(llmapi.ErrNoPrompt), errPrompt(llmapi.ErrTooDeep), errPrompt(llmapi.ErrInvalidJSON),
		errPrompt(llmapi.ErrNotObject), errMediaType("text/plain"), errNoCapacity(time.Second),
		errNotInSubset(nil), errUnknownModel("m"),
	} {
		if !slices.Contains(Reasons, r.Reason) {
			t.Errorf("reason %q (status %d) is not in Reasons", r.Reason, r.Status)
		}
	}
}
