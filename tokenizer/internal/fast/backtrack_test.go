package fast

import (
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	tiktokenloader "github.com/pkoukk/tiktoken-go-loader"
)

// naiveMerge is byte-pair merging by rank written the obvious way, for
// short texts: it returns the parts of p.
func naiveMerge(p string, rank func(string) uint32) []string {
	parts := make([]string, len(p))
	for i := range len(p) {
		parts[i] = p[i : i+1]
	}
	for len(parts) > 1 {
		best, at := uint32(noRank), -1
		for k := 0; k+1 < len(parts); k++ {
			if r := rank(parts[k] + parts[k+1]); r < best {
				best, at = r, k
			}
		}
		if at < 0 {
			break
		}
		parts[at] += parts[at+1]
		parts = append(parts[:at+1], parts[at+2:]...)
	}
	return parts
}

// vocabulary returns the tokens of an encoding, by rank.
func vocabulary(t *testing.T, name string) []string {
	t.Helper()
	loaded, err := tiktokenloader.NewOfflineLoader().LoadTiktokenBpe(encodingFiles[name])
	if err != nil {
		t.Fatal(err)
	}
	toks := make([]string, len(loaded))
	for tok, r := range loaded {
		toks[r] = tok
	}
	return toks
}

// TestBacktracker checks the backtracker's parts against merging written
// the obvious way: that it builds for both encodings, that compatible
// says of two tokens exactly whether merging their bytes gives them back,
// and that count agrees with mergeLarge on long texts with no
// pre-tokenizer in front (any bytes, any tokens side by side).
func TestBacktracker(t *testing.T) {
	_, fasts := engines(t)
	for _, name := range encodings {
		e := fasts[name]
		b := e.bt
		if b == nil {
			t.Fatalf("%s: no backtracker: the vocabulary breaks its rules", name)
		}
		toks := vocabulary(t, name)
		rng := rand.New(rand.NewPCG(6, uint64(len(toks))))
		// Tokens that merging their own bytes reaches; pairs of them drawn
		// at random, half of them sharing a byte across the boundary so
		// that both answers come up often.
		var reach []uint32
		for r, tok := range toks {
			if got, _ := b.longest(tok); got == uint32(r) {
				reach = append(reach, uint32(r))
			}
		}
		// Every token of both vocabularies is reachable (so the trie holds
		// them all); the backtracker would leave out any that were not.
		if len(reach) != len(toks) {
			t.Fatalf("%s: %d of %d tokens reachable", name, len(reach), len(toks))
		}
		var yes, no int
		for k := range 20000 {
			x, y := reach[rng.IntN(len(reach))], reach[rng.IntN(len(reach))]
			if k%2 == 0 { // y from a token that starts where x ends
				for range 50 {
					z := reach[rng.IntN(len(reach))]
					if toks[z][0] == toks[x][len(toks[x])-1] && len(toks[z]) > 1 {
						y, _ = b.longest(toks[z][1:])
						break
					}
				}
			}
			parts := naiveMerge(toks[x]+toks[y], e.ranks.get)
			want := len(parts) == 2 && parts[0] == toks[x]
			if got := b.compatible(x, b.info[x], y, b.info[y]); got != want {
				t.Fatalf("%s: compatible(%q, %q) = %v, merging gives %q", name, toks[x], toks[y], got, parts)
			}
			if want {
				yes++
			} else {
				no++
			}
		}
		if yes < 1000 || no < 1000 {
			t.Fatalf("%s: %d compatible and %d incompatible pairs: the test does not cover both", name, yes, no)
		}

		sc := new(largeScratch)
		for k := range 300 {
			var sb strings.Builder
			size := 200 + rng.IntN(4000)
			for sb.Len() < size {
				switch k % 4 {
				case 0: // tokens side by side
					sb.WriteString(toks[reach[rng.IntN(len(reach))]])
				case 1: // any bytes
					sb.WriteByte(byte(rng.IntN(256)))
				case 2: // few distinct bytes, where merges chain and overlap
					sb.WriteByte(" =-ab\n"[rng.IntN(6)])
				case 3: // runs of one byte
					sb.WriteString(strings.Repeat("-=* a"[rng.IntN(5):][:1], 1+rng.IntN(300)))
				}
			}
			p := sb.String()
			want, _ := e.mergeLarge(p, time.Time{})
			got, ok := b.count(p, sc, 1<<20, time.Time{}) // no bound: check the search itself
			if !ok || got != want {
				t.Fatalf("%s: backtracker counts %.60q... as %d (ok %v), merging as %d", name, p, got, ok, want)
			}
		}
	}
}

// TestBacktrackerGivesUp checks that count stops once it has tried more
// candidates than its bound for the bytes it has got past, as on a long run
// of one punctuation mark, and once its deadline has passed; pieceTokens
// then merges the piece, exactly.
func TestBacktrackerGivesUp(t *testing.T) {
	_, fasts := engines(t)
	sc := new(largeScratch)
	for _, name := range encodings {
		e := fasts[name]
		p := strings.Repeat(" tokenizer", 10)
		if _, ok := e.bt.count(p, sc, 0, time.Time{}); ok {
			t.Fatalf("%s: count went on past its bound", name)
		}
		if _, ok := e.bt.count(p, sc, backtrackWork, time.Time{}); !ok {
			t.Fatalf("%s: count gave up on words", name)
		}
		long := strings.Repeat("语言模型", 4000) // one piece of 48 KB
		if _, ok := e.bt.count(long, sc, backtrackWork, time.Now().Add(-time.Second)); ok {
			t.Fatalf("%s: count went on past its deadline", name)
		}
		if _, ok := e.bt.count(long, sc, backtrackWork, time.Time{}); !ok {
			t.Fatalf("%s: count gave up on Chinese", name)
		}
		dashes := strings.Repeat("-", 4000)
		if _, ok := e.bt.count(dashes, sc, backtrackWork, time.Time{}); ok {
			t.Fatalf("%s: count did not give up on a run of dashes", name)
		}
		want, _ := e.mergeLarge(dashes, time.Time{})
		head, h := headHash(dashes)
		if got, _ := e.pieceTokens(dashes, head, h, time.Time{}); got != want {
			t.Fatalf("%s: pieceTokens counts %d dashes as %d, merging as %d", name, len(dashes), got, want)
		}
	}
}

// TestMemo checks that the memo of piece counts answers only for the same
// bytes in the same text: pieces that share a slot, a length and their
// first 8 bytes, or a text that came before.
func TestMemo(t *testing.T) {
	var m memo
	m.next()
	s := "abcdefgh-one abcdefgh-two"
	one, two := s[:12], s[13:]
	head1, h := headHash(one)
	head2, _ := headHash(two)
	if head1 != head2 {
		t.Fatal("the pieces must share their first 8 bytes")
	}
	m.put(0, one, head1, h, 3)
	if n, ok := m.get(s, one, head1, h); !ok || n != 3 {
		t.Fatalf("get(one) = %d, %v; want 3, true", n, ok)
	}
	if _, ok := m.get(s, two, head2, h); ok { // two in one's slot
		t.Fatal("a piece with the same head and length but other bytes was found")
	}
	m.next()
	if _, ok := m.get(s, one, head1, h); ok {
		t.Fatal("a piece of the previous text was found")
	}
}
