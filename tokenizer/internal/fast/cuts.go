package fast

import (
	"math/bits"
	"slices"
	"time"
)

// cuts finds, between two characters of three bytes (Chinese, Japanese,
// Korean), the places that no token of the vocabulary can cross. Byte-pair
// merging never joins two parts across such a place (the union would be a
// token crossing it), so the merges on each side happen as they would
// alone and the piece's count is the sum of its stretches' counts. Most
// stretches are one character, whose count alone is in a table: a piece of
// Chinese costs a table read and a hash probe or two per character, where
// the backtracker costs a trie walk and a compatibility check.
//
// A token crosses the place between characters a and b when it holds a
// non-empty end of a followed by a non-empty start of b. Its part on a's
// side is all of a (when the token starts at or before a's first byte) or
// a's last one or two bytes (when it starts inside a); its part on b's
// side likewise all of b or b's first one or two bytes. Each token is
// read once, at each place inside it where a character starts, and the
// pair of parts it shows there goes into a set; a place is open when one
// of the (up to) nine pairs its two characters make is in the set.
type cuts struct {
	// chars holds, for each rune of three bytes (U+0800 to U+FFFF, from
	// index 0), which of its parts the set holds on the left of a place
	// (bits 0-2: whole, last byte, last two bytes), which on the right
	// (bits 3-5: whole, first byte, first two bytes), and its token count
	// alone (bits 6-7, 1 to 3).
	chars []uint8
	// filter is a Bloom filter of the set, three bits in one word a key
	// and 16 bits a key in all (1 KiB for cl100k_base, 32 KiB for
	// o200k_base): small enough for a core's cache. A key not in the set
	// may be taken for one (about 0.5% of them), which leaves a closed
	// place open and costs only time.
	filter []uint64
	mask   uint64 // of word indexes
}

// Parts of a character at a place, as cutKey encodes them.
const (
	partWhole = 1 // the whole character
	partOne   = 2 // its last (left side) or first (right side) byte
	partTwo   = 3 // its last or first two bytes
)

// cutKey packs the parts on each side of a place: up to three bytes and
// their kind on each side, never 0.
func cutKey(left uint32, lkind int, right uint32, rkind int) uint64 {
	return uint64(left) | uint64(lkind)<<24 | uint64(right)<<32 | uint64(rkind)<<56
}

// newCuts reads the places inside every token of ranks; count is the
// number of parts merging a text of one character leaves.
func newCuts(ranks map[string]int, count func(string) int) *cuts {
	c := &cuts{chars: make([]uint8, 0x10000-0x800)}
	var keys []uint64
	for tok := range ranks {
		for p := 1; p < len(tok); p++ {
			if tok[p] < 0xE0 || tok[p] >= 0xF0 {
				continue // no character of three bytes starts here
			}
			var left uint32
			var lkind int
			switch {
			case p >= 3 && tok[p-3] >= 0xE0 && tok[p-3] < 0xF0 && cont(tok[p-2]) && cont(tok[p-1]):
				left, lkind = load3(tok[p-3:]), partWhole
			case p == 1 && cont(tok[0]):
				left, lkind = uint32(tok[0]), partOne
			case p == 2 && cont(tok[0]) && cont(tok[1]):
				left, lkind = uint32(tok[0])|uint32(tok[1])<<8, partTwo
			default:
				continue // a's side is not the end of a three-byte character
			}
			var right uint32
			var rkind int
			switch {
			case len(tok)-p >= 3 && cont(tok[p+1]) && cont(tok[p+2]):
				right, rkind = load3(tok[p:]), partWhole
			case len(tok)-p == 1:
				right, rkind = uint32(tok[p]), partOne
			case len(tok)-p == 2 && cont(tok[p+1]):
				right, rkind = uint32(tok[p])|uint32(tok[p+1])<<8, partTwo
			default:
				continue
			}
			keys = append(keys, cutKey(left, lkind, right, rkind))
		}
	}
	slices.Sort(keys)
	keys = slices.Compact(keys)
	words := uint64(64)
	for words*64 < uint64(len(keys))*16 {
		words <<= 1
	}
	c.filter, c.mask = make([]uint64, words), words-1
	for _, k := range keys {
		h := cutHash(k)
		c.filter[h&c.mask] |= cutBits(h)
	}
	// Which parts of each character occur, on either side.
	lefts, rights := map[uint64]bool{}, map[uint64]bool{}
	for _, k := range keys {
		lefts[k&(1<<32-1)] = true
		rights[k>>32] = true
	}
	var buf [3]byte
	for r := rune(0x800); r <= 0xFFFF; r++ {
		if r >= 0xD800 && r <= 0xDFFF {
			continue // surrogates: not in valid text
		}
		buf[0], buf[1], buf[2] = byte(0xE0|r>>12), byte(0x80|r>>6&0x3F), byte(0x80|r&0x3F)
		s := string(buf[:])
		w := load3(s)
		var info uint8
		for i, l := range []uint64{uint64(w) | partWhole<<24, uint64(w>>16) | partOne<<24, uint64(w>>8) | partTwo<<24} {
			if lefts[l] {
				info |= 1 << i
			}
		}
		for i, rt := range []uint64{uint64(w) | partWhole<<24, uint64(w&0xFF) | partOne<<24, uint64(w&0xFFFF) | partTwo<<24} {
			if rights[rt] {
				info |= 8 << i
			}
		}
		c.chars[r-0x800] = info | uint8(count(s))<<6
	}
	return c
}

func cont(b byte) bool { return b&0xC0 == 0x80 }

// load3 returns the first three bytes of s, little-endian.
func load3(s string) uint32 { return uint32(s[0]) | uint32(s[1])<<8 | uint32(s[2])<<16 }

func cutHash(k uint64) uint64 {
	k ^= k >> 29
	k *= 0xBF58476D1CE4E5B9
	return k ^ k>>32
}

// cutBits is the three bits of a key's word, from its hash's top bits.
func cutBits(h uint64) uint64 {
	return 1<<(h>>58) | 1<<(h>>52&63) | 1<<(h>>46&63)
}

// has reports whether k may be in the set (and surely is not, if false).
func (c *cuts) has(k uint64) bool {
	h := cutHash(k)
	b := cutBits(h)
	return c.filter[h&c.mask]&b == b
}

// closed reports whether no token crosses the place between a and b, two
// characters of three bytes (as load3 reads them) whose chars entries are
// ia and ib.
func (c *cuts) closed(a uint32, ia uint8, b uint32, ib uint8) bool {
	ls, rs := ia&7, ib>>3&7
	if ls == 0 || rs == 0 {
		return true
	}
	// Fast path: only whole characters on both sides, one probe.
	if ls == 1 && rs == 1 {
		return !c.has(cutKey(a, partWhole, b, partWhole))
	}
	lparts := [3]uint32{a, a >> 16, a >> 8}
	rparts := [3]uint32{b, b & 0xFF, b & 0xFFFF}
	for l := ls; l != 0; l &= l - 1 {
		i := bits.TrailingZeros8(l)
		for r := rs; r != 0; r &= r - 1 {
			j := bits.TrailingZeros8(r)
			if c.has(cutKey(lparts[i], i+1, rparts[j], j+1)) {
				return false
			}
		}
	}
	return true
}

// cutTokens counts piece p (valid UTF-8) by its stretches between closed
// places, a stretch of one character from its chars entry and a longer one
// with stretchTokens; ok is false when that gave up at the deadline. uncut
// reports that the piece has no closed place (and was not counted).
func (e *Encoding) cutTokens(p string, deadline time.Time) (n int, ok, uncut bool) {
	c := e.cuts
	start := 0    // of the current stretch
	prev := -1    // start of the character before, if of three bytes
	var pa uint32 // its bytes
	var pi uint8  // its chars entry
	for i := 0; i < len(p); {
		b := p[i]
		if b < 0xE0 || b >= 0xF0 {
			prev = -1
			i += runeLen(b)
			continue
		}
		w, info := load3(p[i:]), c.chars[rune3(p[i:])-0x800]
		if prev >= 0 && c.closed(pa, pi, w, info) {
			if prev == start { // one character
				n += int(pi >> 6)
			} else if m, ok := e.stretchTokens(p[start:i], deadline); ok {
				n += m
			} else {
				return 0, false, false
			}
			start = i
		}
		prev, pa, pi = i, w, info
		i += 3
	}
	switch {
	case start == 0:
		return 0, true, true
	case prev == start: // one character
		return n + int(pi>>6), true, false
	}
	m, ok := e.stretchTokens(p[start:], deadline)
	if !ok {
		return 0, false, false
	}
	return n + m, true, false
}

// stretchTokens counts a stretch of more than one character of a cut
// piece, as pieceTokens counts a piece.
func (e *Encoding) stretchTokens(s string, deadline time.Time) (int, bool) {
	if len(s) <= e.longest && e.ranks.get(s) != noRank {
		return 1, true
	}
	return e.mergeTokens(s, deadline)
}

// runeLen is the length of the UTF-8 sequence that starts with b (1 for a
// continuation byte, which valid text never starts a rune with).
func runeLen(b byte) int {
	switch {
	case b < 0xC0:
		return 1
	case b < 0xE0:
		return 2
	case b < 0xF0:
		return 3
	}
	return 4
}
