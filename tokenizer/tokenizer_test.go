package tokenizer

import (
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
)

// The expected counts in this file were checked by hand against OpenAI's
// Python reference implementation (tiktoken 0.x) loaded with the same BPE
// files: len(get_encoding(name).encode(s, disallowed_special=())).

func newTokenizer(t testing.TB, encoding string) *Tokenizer {
	t.Helper()
	tk, err := New(Options{Encoding: encoding})
	if err != nil {
		t.Fatalf("New(%q): %v", encoding, err)
	}
	return tk
}

func TestCount(t *testing.T) {
	cases := []struct {
		text          string
		cl100k, o200k int
	}{
		{"", 0, 0},
		{"Hello, world!", 4, 4},
		{"You are a helpful assistant.", 6, 6},
		{"The quick brown fox jumps over the lazy dog.", 10, 10},
		{"日本語のテキストです。", 10, 8},
		{"👩\u200d💻 ships 🚀 code", 12, 9},
		{"Réponse à l'élève", 7, 6},
		{"   lots   of   spaces   ", 7, 7},
		{"def f(x):\n    return x**2\n", 10, 10},
		// Special-token text in a prompt is ordinary text.
		{"<|endoftext|>", 7, 7},
	}
	// Texts longer than one chunk are counted in chunks; these must stay exact.
	cases = append(cases,
		struct {
			text          string
			cl100k, o200k int
		}{strings.Repeat("The quick brown fox jumps over the lazy dog. ", 400), 4001, 4001},
		struct {
			text          string
			cl100k, o200k int
		}{strings.Repeat("Réponse à l'élève, déjà vu. ", 500), 5501, 5001},
	)
	cl, o := newTokenizer(t, "cl100k_base"), newTokenizer(t, "o200k_base")
	for _, c := range cases {
		if got := cl.Count(c.text); got != c.cl100k {
			t.Errorf("cl100k_base Count(%.40q) = %d, want %d", c.text, got, c.cl100k)
		}
		if got := o.Count(c.text); got != c.o200k {
			t.Errorf("o200k_base Count(%.40q) = %d, want %d", c.text, got, c.o200k)
		}
	}
}

func TestNewUnknownEncoding(t *testing.T) {
	if _, err := New(Options{Encoding: "p51k_base"}); err == nil || !strings.Contains(err.Error(), "p51k_base") {
		t.Fatalf("New(p51k_base) error = %v, want one naming the encoding", err)
	}
}

// TestOffline loads both encodings in a child process that cannot reach any
// network and has an empty tiktoken cache: a loader that downloads would fail.
func TestOffline(t *testing.T) {
	if os.Getenv("TOKENLB_OFFLINE_CHILD") == "1" {
		for _, e := range Encodings {
			tk, err := New(Options{Encoding: e})
			if err != nil {
				t.Fatalf("New(%s) offline: %v", e, err)
			}
			if got := tk.Count("Hello, world!"); got != 4 {
				t.Fatalf("%s offline count = %d, want 4", e, got)
			}
		}
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestOffline$", "-test.v")
	cmd.Env = append(os.Environ(),
		"TOKENLB_OFFLINE_CHILD=1",
		"TIKTOKEN_CACHE_DIR="+t.TempDir(),
		// Port 9 on loopback (discard) is closed here; every HTTP client that
		// honours proxy settings fails at once.
		"HTTP_PROXY=http://127.0.0.1:9", "HTTPS_PROXY=http://127.0.0.1:9",
		"http_proxy=http://127.0.0.1:9", "https_proxy=http://127.0.0.1:9", "NO_PROXY=",
	)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: TestOffline") {
		t.Fatalf("offline child failed: %v\n%s", err, out)
	}
}

func TestConcurrentCount(t *testing.T) {
	cl := newTokenizer(t, "cl100k_base")
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 50 {
				if got := cl.Count("The quick brown fox jumps over the lazy dog."); got != 10 {
					t.Errorf("concurrent Count = %d, want 10", got)
					return
				}
			}
		})
	}
	wg.Wait()
}

// TestBytesEngine: the bytes engine counts a token per 4 bytes, rounded up.
func TestBytesEngine(t *testing.T) {
	tk, err := New(Options{Engine: "bytes", CacheEntries: -1})
	if err != nil {
		t.Fatal(err)
	}
	for text, want := range map[string]int{"": 0, "a": 1, "abcd": 1, "abcde": 2, "日本語": 3} {
		if got := tk.Count(text); got != want {
			t.Errorf("Count(%q) = %d, want %d", text, got, want)
		}
	}
}
