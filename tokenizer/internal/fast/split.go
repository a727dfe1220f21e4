package fast

import (
	"math/bits"
	"unicode"
	"unicode/utf8"
)

// The pre-tokenizers below split text exactly as the regular expressions of
// cl100k_base and o200k_base do under a backtracking engine (leftmost
// alternative first, greedy quantifiers giving back one rune at a time):
//
//	cl100k_base: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//	             ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//	o200k_base:  [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|
//	             [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|
//	             \p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
//
// \s is unicode.IsSpace and the classes are Go's unicode tables, as in the
// regexp2 engine tiktoken-go runs them with; (?i) compares unicode.ToLower
// of the text with the lower-case pattern, which only the ASCII capitals
// satisfy for these letters. Each function returns the end of the piece that
// starts at byte i of valid UTF-8 text s; every rune belongs to exactly one
// piece, as with the regular expressions.

// Rune classes, as bits.
const (
	cLetter  uint8 = 1 << iota // \p{L}
	cNumber                    // \p{N}
	cSpace                     // \s (unicode.IsSpace)
	cNewline                   // \r or \n
	cUpper                     // [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]
	cLower                     // [\p{Ll}\p{Lm}\p{Lo}\p{M}]
	cMark                      // \p{M}
)

// asciiClass holds the classes of the ASCII runes.
var asciiClass = func() (t [utf8.RuneSelf]uint8) {
	for r := range rune(utf8.RuneSelf) {
		t[r] = classOf(r)
	}
	return t
}()

func classOf(r rune) uint8 {
	var c uint8
	switch {
	case unicode.IsLetter(r):
		c |= cLetter
		if unicode.In(r, unicode.Lu, unicode.Lt, unicode.Lm, unicode.Lo) {
			c |= cUpper
		}
		if unicode.In(r, unicode.Ll, unicode.Lm, unicode.Lo) {
			c |= cLower
		}
	case unicode.IsNumber(r):
		c |= cNumber
	case unicode.IsMark(r):
		c |= cMark | cUpper | cLower
	case unicode.IsSpace(r):
		c |= cSpace
		if r == '\r' || r == '\n' {
			c |= cNewline
		}
	}
	return c
}

// class returns the classes of the rune at s[i] and its size in bytes.
func class(s string, i int) (uint8, int) {
	switch b := s[i]; {
	case b < utf8.RuneSelf:
		return asciiClass[b], 1
	case b >= 0xE0 && b < 0xF0: // three bytes (Chinese, Japanese, Korean, ...): the text is valid
		return bmpClasses[rune3(s[i:])], 3
	case b < 0xE0: // two bytes
		return bmpClasses[rune(b&0x1F)<<6|rune(s[i+1]&0x3F)], 2
	}
	r, n := utf8.DecodeRuneInString(s[i:])
	return classOf(r), n
}

// rune3 decodes the rune of three bytes at the start of s, which the
// caller knows is one.
func rune3(s string) rune {
	return rune(s[0]&0x0F)<<12 | rune(s[1]&0x3F)<<6 | rune(s[2]&0x3F)
}

// bmpClasses holds the classes of the Basic Multilingual Plane, where
// nearly all text is (built when the program starts, in a few
// milliseconds; read on every rune past ASCII, so not behind a sync.Once).
var bmpClasses = func() *[1 << 16]uint8 {
	t := new([1 << 16]uint8)
	for r := range rune(1 << 16) {
		t[r] = classOf(r)
	}
	return t
}()

// isP reports the class [^\r\n\p{L}\p{N}].
func isP(c uint8) bool { return c&(cNewline|cLetter|cNumber) == 0 }

// isQ reports the class [^\s\p{L}\p{N}].
func isQ(c uint8) bool { return c&(cSpace|cLetter|cNumber) == 0 }

// contraction returns the length of (?i:'s|'t|'re|'ve|'m|'ll|'d) at s[i:],
// or 0.
func contraction(s string, i int) int {
	if i+1 >= len(s) || s[i] != '\'' {
		return 0
	}
	switch lower(s[i+1]) {
	case 's', 't', 'm', 'd':
		return 2
	case 'r', 'v', 'l':
		if i+2 < len(s) {
			want := byte('e')
			if lower(s[i+1]) == 'l' {
				want = 'l'
			}
			if lower(s[i+2]) == want {
				return 3
			}
		}
	}
	return 0
}

func lower(b byte) byte {
	if 'A' <= b && b <= 'Z' {
		return b + 'a' - 'A'
	}
	return b
}

// run returns the end of the longest run of runes from i that have any of
// the classes in want.
func run(s string, i int, want uint8) int {
	for i < len(s) {
		if b := s[i]; b < utf8.RuneSelf { // most text: no decoding
			if asciiClass[b]&want == 0 {
				break
			}
			i++
			continue
		}
		c, n := class(s, i)
		if c&want == 0 {
			break
		}
		i += n
	}
	return i
}

// numbers returns the end of \p{N}{1,3} at i, or i.
func numbers(s string, i int) int {
	for k := 0; k < 3 && i < len(s); k++ {
		c, n := class(s, i)
		if c&cNumber == 0 {
			break
		}
		i += n
	}
	return i
}

// punct returns the end of ' '?[^\s\p{L}\p{N}]+ followed by a run of the
// bytes in tail, or i when there is none at i.
func punct(s string, i int, tail string) int {
	j := i
	if s[j] == ' ' {
		j++
	}
	if j >= len(s) {
		return i
	}
	if c, _ := class(s, j); !isQ(c) {
		return i
	}
	for j < len(s) {
		c, n := class(s, j)
		if !isQ(c) {
			break
		}
		j += n
	}
	for j < len(s) && (s[j] == '\r' || s[j] == '\n' || tail != "" && s[j] == tail[0]) {
		j++
	}
	return j
}

// spaces returns the end of \s*[\r\n]+|\s+(?!\S)|\s+ at i, which holds a
// space.
func spaces(s string, i int) int {
	j, lastNL, last := i, -1, i
	for j < len(s) {
		c, n := class(s, j)
		if c&cSpace == 0 {
			break
		}
		if c&cNewline != 0 {
			lastNL = j
		}
		last = j
		j += n
	}
	switch {
	case lastNL >= 0: // \s*[\r\n]+ backs up to the last newline
		return lastNL + 1
	case j == len(s) || last == i: // \s+(?!\S) at the end, or \s+
		return j
	default: // \s+(?!\S) leaves the last space to the next piece
		return last
	}
}

// splitCL100K returns the end of the cl100k_base piece at i. Most pieces
// of most text are an ASCII word with or without a leading space or
// punctuation: those are found here without decoding a rune.
func splitCL100K(s string, i int) int {
	if b := s[i]; b < utf8.RuneSelf && b != '\'' {
		c := asciiClass[b]
		if c&cLetter != 0 {
			return letters(s, i+1)
		}
		if isP(c) && i+1 < len(s) && s[i+1] < utf8.RuneSelf && asciiClass[s[i+1]]&cLetter != 0 {
			return letters(s, i+2)
		}
		if j := asciiPiece(s, i, '\n'); j > i {
			return j
		}
	}
	return splitCL100KRunes(s, i)
}

// asciiPiece returns the end of the number, punctuation or space piece at
// i, where neither word alternative matches, when it can tell from ASCII
// bytes alone; else i. Punctuation takes a run of newlines and of the byte
// tail after it.
func asciiPiece(s string, i int, tail byte) int {
	b := s[i]
	switch c := asciiClass[b]; {
	case c&cNumber != 0: // \p{N}{1,3}
		j := i + 1
		for j < len(s) && j < i+3 && '0' <= s[j] && s[j] <= '9' {
			j++
		}
		if j < len(s) && j < i+3 && s[j] >= utf8.RuneSelf {
			return i // a number past ASCII may follow
		}
		return j
	case c&cSpace == 0 || b == ' ' && i+1 < len(s) && s[i+1] < utf8.RuneSelf && isQ(asciiClass[s[i+1]]):
		// ' '?[^\s\p{L}\p{N}]+ then the tail.
		j := i
		if b == ' ' {
			j++
		}
		for j < len(s) && s[j] < utf8.RuneSelf && isQ(asciiClass[s[j]]) {
			j++
		}
		if j < len(s) && s[j] >= utf8.RuneSelf {
			return i // punctuation past ASCII may follow
		}
		for j < len(s) && (s[j] == '\r' || s[j] == '\n' || s[j] == tail) {
			j++
		}
		return j
	}
	// \s*[\r\n]+|\s+(?!\S)|\s+, as spaces does.
	j, lastNL, last := i, -1, i
	for j < len(s) && s[j] < utf8.RuneSelf && asciiClass[s[j]]&cSpace != 0 {
		if s[j] == '\r' || s[j] == '\n' {
			lastNL = j
		}
		last = j
		j++
	}
	switch {
	case j < len(s) && s[j] >= utf8.RuneSelf:
		return i // a space past ASCII may follow
	case lastNL >= 0:
		return lastNL + 1
	case j == len(s) || last == i:
		return j
	default:
		return last
	}
}

// asciiLetter reports the ASCII letters, indexed by any byte.
var asciiLetter = func() (t [256]bool) {
	for b := range utf8.RuneSelf {
		t[b] = asciiClass[b]&cLetter != 0
	}
	return t
}()

// letters returns the end of the run of letters from j, ASCII first.
func letters(s string, j int) int {
	// Eight bytes at a time while they are all ASCII letters: a byte below
	// 0x80 is one when, with bit 0x20 set, it lies in 'a' to 'z'; with the
	// top bits cleared no lane's sum carries into the next.
	const ones, tops = 0x0101010101010101, 0x8080808080808080
	for j+8 <= len(s) {
		w := load64(s[j:])
		x := (w | 0x20*ones) &^ tops
		letter := (x + (0x80-'a')*ones) &^ (x + (0x80-'z'-1)*ones) &^ w & tops
		if letter != tops {
			j += bits.TrailingZeros64(^letter&tops) / 8
			break
		}
		j += 8
	}
	for j < len(s) && asciiLetter[s[j]] {
		j++
	}
	if j < len(s) && s[j] >= utf8.RuneSelf {
		return run(s, j, cLetter)
	}
	return j
}

// splitCL100KRunes is splitCL100K for any piece.
func splitCL100KRunes(s string, i int) int {
	if n := contraction(s, i); n > 0 {
		return i + n
	}
	c, n := class(s, i)
	if c&cLetter != 0 {
		return run(s, i+n, cLetter)
	}
	if isP(c) && i+n < len(s) {
		if c2, n2 := class(s, i+n); c2&cLetter != 0 {
			return run(s, i+n+n2, cLetter)
		}
	}
	if c&cNumber != 0 {
		return numbers(s, i)
	}
	if j := punct(s, i, ""); j > i {
		return j
	}
	return spaces(s, i)
}

// splitO200K returns the end of the o200k_base piece at i, an ASCII word
// (with or without a leading space or punctuation) without decoding a rune.
func splitO200K(s string, i int) int {
	if b := s[i]; b < utf8.RuneSelf {
		w := i // the word's first letter
		if c := asciiClass[b]; isP(c) && i+1 < len(s) && s[i+1] < utf8.RuneSelf && asciiClass[s[i+1]]&cLetter != 0 {
			w = i + 1
		} else if c&cLetter == 0 {
			if j := asciiPiece(s, i, '/'); j > i {
				return j
			}
			return splitO200KRunes(s, i)
		}
		// ASCII capitals are only upper and small letters only lower, so
		// both word alternatives end after a run of capitals and a run of
		// small letters, whichever of the two is empty.
		j := w
		for j < len(s) && 'A' <= s[j] && s[j] <= 'Z' {
			j++
		}
		for j < len(s) && 'a' <= s[j] && s[j] <= 'z' {
			j++
		}
		if j == len(s) || s[j] < utf8.RuneSelf {
			return j + contraction(s, j)
		}
		// A rune past ASCII may continue the word.
	}
	return splitO200KRunes(s, i)
}

// splitO200KRunes is splitO200K for any piece.
func splitO200KRunes(s string, i int) int {
	c, n := class(s, i)
	// The two word alternatives, each first with the optional leading
	// rune and then without it.
	if isP(c) && i+n < len(s) {
		if j := wordLower(s, i+n); j > 0 {
			return j + contraction(s, j)
		}
	}
	if j := wordLower(s, i); j > 0 {
		return j + contraction(s, j)
	}
	if isP(c) && i+n < len(s) {
		if j := wordUpper(s, i+n); j > 0 {
			return j + contraction(s, j)
		}
	}
	if j := wordUpper(s, i); j > 0 {
		return j + contraction(s, j)
	}
	if c&cNumber != 0 {
		return numbers(s, i)
	}
	if j := punct(s, i, "/"); j > i {
		return j
	}
	return spaces(s, i)
}

// wordLower returns the end of [Upper]*[Lower]+ at p, or 0. The upper run
// is greedy and gives back one rune at a time until a lower run can follow.
func wordLower(s string, p int) int {
	j, lastLower := p, 0
	for j < len(s) {
		c, n := class(s, j)
		if c&cUpper == 0 {
			break
		}
		j += n
		if c&cLower != 0 {
			lastLower = j
		}
	}
	if j < len(s) {
		if c, n := class(s, j); c&cLower != 0 {
			return run(s, j+n, cLower)
		}
	}
	// Given back: the lower run is the last lower rune of the upper run
	// alone, since the runes after it are not lower.
	return lastLower
}

// wordUpper returns the end of [Upper]+[Lower]* at p, or 0.
func wordUpper(s string, p int) int {
	j := run(s, p, cUpper)
	if j == p {
		return 0
	}
	return run(s, j, cLower)
}
