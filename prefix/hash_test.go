package prefix

import (
	"encoding/json"
	"hash/maphash"
	"reflect"
	"strings"
	"testing"

	"github.com/tokenlb/tokenlb/llmapi"
)

// hashing counts nothing and hashes each text llmapi.Parse finds.
type hashing struct{ h *Hasher }

func (x hashing) Count(s string) int { x.h.Write(s); return 0 }

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

// TestPrefixHashes: prompts that start with the same text share the hashes
// of their common full blocks, and no others; a partial block is left out;
// with Blocks 0 nothing is hashed.
func TestPrefixHashes(t *testing.T) {
	opts := Hashing{Blocks: 8, BlockBytes: 64, Seed: maphash.MakeSeed()}
	doc := strings.Repeat("the same long document, ", 20) // 480 bytes
	prefix := func(system, user string) []uint64 {
		h := NewHasher(opts)
		if _, err := llmapi.Parse("/v1/chat/completions", chatBody(t, system, user), hashing{&h}); err != nil {
			t.Fatal(err)
		}
		return h.Sum()
	}
	a, b := prefix(doc, "question one"), prefix(doc, "question two, longer than the first one is")
	// "system" + doc is 486 bytes: 7 full blocks, then the rest of the doc
	// and the question.
	if len(a) != 7 || len(b) != 8 {
		t.Fatalf("blocks %d and %d, want 7 (a partial eighth left out) and 8", len(a), len(b))
	}
	if !reflect.DeepEqual(a, b[:7]) {
		t.Fatal("two prompts with the same first 7 blocks differ in them")
	}
	c := prefix("x"+doc, "question one")
	for i := range c {
		if c[i] == a[i] {
			t.Fatalf("block %d of a different prompt hashes the same", i)
		}
	}
	// A change in block 3 changes blocks 3 on and nothing before.
	changed := doc[:200] + "X" + doc[201:]
	d := prefix(changed, "question one")
	if !reflect.DeepEqual(d[:3], a[:3]) || d[3] == a[3] || d[6] == a[6] {
		t.Fatal("a change in block 4 did not change exactly the hashes from block 4 on")
	}
	off := NewHasher(Hashing{Seed: opts.Seed})
	llmapi.Parse("/v1/chat/completions", chatBody(t, doc, "q"), hashing{&off})
	if off.Sum() != nil {
		t.Fatalf("hashed %d blocks with Blocks 0", len(off.Sum()))
	}
}
