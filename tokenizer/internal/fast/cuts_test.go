package fast

import (
	"math/rand/v2"
	"strings"
	"testing"
	"time"
	"unicode"
	"unicode/utf8"
)

// places returns the byte offsets in s (valid UTF-8) where one character
// of three bytes ends and another begins.
func places(s string) []int {
	var out []int
	prev := 0
	for i, r := range s {
		n := utf8.RuneLen(r)
		if i > 0 && prev == 3 && n == 3 {
			out = append(out, i)
		}
		prev = n
	}
	return out
}

// closedAt asks the encoding's cuts about the place at offset i of s.
func closedAt(c *cuts, s string, i int) bool {
	a, b := s[i-3:], s[i:]
	return c.closed(load3(a), c.chars[rune3(a)-0x800], load3(b), c.chars[rune3(b)-0x800])
}

// TestCutsOpen puts every token of both vocabularies into valid text (with
// bytes around it to complete the characters it starts or ends inside of)
// and checks that every place between two characters of three bytes that
// the token covers is open: a place called closed that a token crosses
// would split a piece where merging may join it.
func TestCutsOpen(t *testing.T) {
	_, fasts := engines(t)
	befores := []string{"", "\xe4", "\xe4\x80", "\xc3", "\xf0", "\xf0\x90", "\xf0\x90\x80"}
	afters := []string{"", "\x80", "\x80\x80", "\x80\x80\x80"}
	for _, name := range encodings {
		c := fasts[name].cuts
		checked, tokens, never := 0, 0, 0
		for _, tok := range vocabulary(t, name) {
			text, at := "", -1
		complete:
			for _, x := range befores {
				for _, y := range afters {
					if s := x + tok + y; utf8.ValidString(s) {
						text, at = s, len(x)
						break complete
					}
				}
			}
			if at < 0 {
				never++ // no valid text holds it (a surrogate's bytes, say)
				continue
			}
			found := false
			for _, i := range places(text) {
				if i > at && i < at+len(tok) {
					found = true
					checked++
					if closedAt(c, text, i) {
						t.Errorf("%s: token %q crosses the place at %d of %q, called closed", name, tok, i, text)
					}
				}
			}
			if found {
				tokens++
			}
		}
		t.Logf("%s: %d places in %d tokens checked; %d tokens never in valid text", name, checked, tokens, never)
		if tokens < 300 {
			t.Errorf("%s: only %d tokens cross a place between characters of three bytes", name, tokens)
		}
	}
}

// TestCutsClose checks that most places in Chinese and Japanese text are
// closed, the point of cuts (an open place is never wrong, only slower).
// The corpus measures 88% with cl100k_base and 69% with o200k_base.
func TestCutsClose(t *testing.T) {
	_, fasts := engines(t)
	text := corpus(t)["cjk"]
	for _, name := range encodings {
		all, closed := 0, 0
		for _, i := range places(text) {
			all++
			if closedAt(fasts[name].cuts, text, i) {
				closed++
			}
		}
		t.Logf("%s: %d of %d places closed", name, closed, all)
		if all < 500 || closed*2 < all {
			t.Errorf("%s: %d of %d places closed, want over half", name, closed, all)
		}
	}
}

// TestCutsMatchTiktoken counts texts of characters of three bytes built to
// put tokens of several characters, and the characters they are made of,
// side by side, with tiktoken-go and with the heap merge (no cuts).
func TestCutsMatchTiktoken(t *testing.T) {
	_, fasts := engines(t)
	rng := rand.New(rand.NewPCG(3, 4))
	n := 400
	if testing.Short() {
		n = 40
	}
	for _, name := range encodings {
		e := fasts[name]
		var words, chars []string
		for _, tok := range vocabulary(t, name) {
			if !utf8.ValidString(tok) {
				continue
			}
			all3 := true
			for _, r := range tok {
				// Letters without case (CJK, kana, Hangul): the text is one
				// piece with either encoding.
				all3 = all3 && utf8.RuneLen(r) == 3 && unicode.In(r, unicode.Lo, unicode.Lm)
			}
			if !all3 || len(tok) == 0 {
				continue
			}
			if len(tok) == 3 {
				chars = append(chars, tok)
			} else {
				words = append(words, tok)
			}
		}
		if len(words) < 100 || len(chars) < 500 {
			t.Fatalf("%s: %d words and %d characters of three bytes", name, len(words), len(chars))
		}
		for range n {
			var b strings.Builder
			for k := 2 + rng.IntN(12); k >= 0; k-- {
				switch rng.IntN(3) {
				case 0:
					b.WriteString(words[rng.IntN(len(words))])
				case 1:
					b.WriteString(chars[rng.IntN(len(chars))])
				default: // a word's characters, from its second one
					w := words[rng.IntN(len(words))]
					b.WriteString(w[3:])
				}
			}
			s := b.String()
			same(t, s)
			// The same text after a space or a mark, and with a letter of
			// two or four bytes inside: several pieces, places that are
			// not between two characters of three bytes.
			k := rng.IntN(len(s)/3) * 3
			same(t, []string{" ", "「", "-"}[rng.IntN(3)]+s[:k]+[]string{"é", "𠀀", "ß"}[rng.IntN(3)]+s[k:])
			if parts, ok := e.mergeLarge(s, time.Time{}); !ok || e.countAll(s) != parts {
				t.Errorf("%s: %q: %d tokens, heap merge %d", name, s, e.countAll(s), parts)
			}
			if t.Failed() {
				return
			}
		}
	}
}

// TestCutsDeadline checks that a piece cut into a short stretch and a long
// one (a word of two characters again and again, every place open) stops
// at a deadline that has passed, and is counted as the heap merge counts
// it without one.
func TestCutsDeadline(t *testing.T) {
	_, fasts := engines(t)
	for _, name := range encodings {
		e := fasts[name]
		word := ""
		for _, tok := range vocabulary(t, name) {
			r, _ := utf8.DecodeRuneInString(tok)
			if len(tok) == 6 && utf8.ValidString(tok) && unicode.IsLetter(r) && len(places(tok)) == 1 && !closedAt(e.cuts, tok+tok, 6) {
				word = tok
				break
			}
		}
		if word == "" {
			t.Fatalf("%s: no word of two characters that is open after itself", name)
		}
		first := "" // a character cut from the word: a first, short stretch
		for r := rune(0x4E00); r < 0x9FFF && first == ""; r++ {
			if c := string(r); closedAt(e.cuts, c+word, 3) {
				first = c
			}
		}
		p := first + strings.Repeat(word, 10000) // 60 KB
		head, h := headHash(p)
		if _, ok := e.pieceTokens(p, head, h, time.Now().Add(-time.Second)); ok {
			t.Errorf("%s: %q repeated: counted past the deadline", name, word)
		}
		want, _ := e.mergeLarge(p, time.Time{})
		if got, ok := e.pieceTokens(p, head, h, time.Time{}); !ok || got != want {
			t.Errorf("%s: %q repeated: %d tokens (ok %v), heap merge %d", name, word, got, ok, want)
		}
	}
}
