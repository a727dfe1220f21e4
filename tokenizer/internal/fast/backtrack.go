package fast

import (
	"encoding/binary"
	"math/bits"
	"slices"
	"strings"
	"time"
)

// backtracker counts the tokens of a long piece in time linear in its
// length (it gives up past backtrackWork candidates a byte), where merging
// costs O(n log n) and several rank lookups a byte.
//
// It rests on two facts about byte-pair merging by rank (tiktoken's, where
// any two adjacent parts whose bytes form a token may merge, the lowest
// rank first):
//
//   - The encoding of a text is the one sequence of tokens whose every two
//     neighbours are compatible: merging their bytes alone gives back the
//     two of them. A merge never crosses a boundary of the final encoding,
//     so the merges on each side happen as they would alone.
//   - Whether two tokens are compatible can be read from how each was
//     merged: walking back in time through the last merge of each (the
//     later one first), no two parts that meet at the boundary may form a
//     token before the merge that ends their meeting, nor at the rank of a
//     merge on the right side (the same bytes further left merge first).
//     This needs every token's parts to rank below it, so that merges
//     happen in rank order; newBacktracker checks that the vocabulary is so.
//
// Counting then goes greedily: at each position take the longest token
// that is compatible with the one before it, try shorter ones when it is
// not, and step back when none is; a position from which no continuation
// exists is remembered, so each is given up once. Most of the time the
// longest token is the right one.
type backtracker struct {
	// info holds, for each rank, its token's length in bytes (the low 8
	// bits), the ranks of the two parts it is last merged from (24 bits
	// each above them; a byte's parts are its value) and the bits
	// leftOfByte to rightOfLonger: one word, so that a step of compatible
	// reads one.
	info []uint64
	// pairs is the rank of every two-byte token, as Encoding.pairs.
	pairs *[1 << 16]uint32
	// shorter is the longest token, other than itself, that a token starts
	// with (noRank for a byte): the next candidate when a token does not fit.
	shorter []uint32
	// merged maps two tokens to the token last merged from them.
	merged pairTable

	// A trie of the tokens finds the longest one a text starts with. Nodes
	// are numbered breadth first, so the children of node i are the nodes
	// first(i) to first(i+1)-1, in the order of their bytes.
	bytes [256]uint32 // rank of each byte
	two   []uint32    // node of each two-byte start, 0 if no token starts so
	// three is the node of each rune of three bytes that is a token (most
	// of Chinese, Japanese and Korean text), 0 for the others.
	three []uint32
	// nodes holds each node's first child in its low 32 bits and the rank
	// of the token it spells (or noRank) in its high ones.
	nodes []uint64
	label []byte // the byte that leads to each node, and 8 zeros
	// unreached counts the tokens that merging their own bytes does not
	// reach (none in cl100k_base and o200k_base).
	unreached int
}

// newBacktracker indexes the vocabulary ranks, merging each token with
// merge (which returns the number of parts and where the last merge joined
// two of them) to learn its parts. It returns nil when the vocabulary
// breaks the rules the backtracker relies on (it never does for
// cl100k_base and o200k_base; see TestBacktracker).
func newBacktracker(ranks map[string]int, pairs *[1 << 16]uint32, merge func(string) (parts, mid int), rank func(string) uint32) *backtracker {
	n := 0
	for _, r := range ranks {
		n = max(n, r+1)
	}
	if n > 1<<20 {
		return nil
	}
	b := &backtracker{
		info:    make([]uint64, n),
		pairs:   pairs,
		shorter: make([]uint32, n),
		two:     make([]uint32, 1<<16),
	}
	toks := make([]token, 0, len(ranks))
	for tok, r := range ranks {
		if len(tok) == 0 || len(tok) > 255 {
			return nil
		}
		b.shorter[r] = noRank
		if len(tok) == 1 {
			b.bytes[tok[0]] = uint32(r)
			b.info[r] = packInfo(1, uint32(tok[0]), uint32(tok[0]))
			continue
		}
		// A token that merging its own bytes does not reach can never be
		// part of an encoding: it stays out of the trie.
		parts, mid := merge(tok)
		if parts != 1 {
			b.unreached++
			continue
		}
		l, rt := rank(tok[:mid]), rank(tok[mid:])
		if l >= uint32(r) && mid > 1 || rt >= uint32(r) && len(tok)-mid > 1 {
			return nil // a part ranks above its token: merges are not in rank order
		}
		b.info[r] = packInfo(len(tok), l, rt)
		toks = append(toks, token{tok, uint32(r)})
	}
	b.merged = newPairTable(len(toks))
	for _, t := range toks {
		l, r := leftPart(b.info[t.rank]), rightPart(b.info[t.rank])
		lByte, rByte := tokSize(b.info[l]) == 1, tokSize(b.info[r]) == 1
		if lByte && rByte {
			continue // two bytes: compatible asks pairs
		}
		b.merged.put(l, r, t.rank)
		if rByte {
			b.info[l] |= leftOfByte
		} else {
			b.info[l] |= leftOfLonger
		}
		if lByte {
			b.info[r] |= rightOfByte
		} else {
			b.info[r] |= rightOfLonger
		}
	}
	b.buildTrie(toks)
	b.three = make([]uint32, 1<<16)
	for r := rune(0x800); r < 1<<16; r++ {
		if r >= 0xD800 && r < 0xE000 {
			continue // surrogates are not runes
		}
		u := string(r)
		node := b.two[uint16(u[0])<<8|uint16(u[1])]
		if node != 0 {
			node = b.child(node, u[2])
		}
		if node != 0 && uint32(b.nodes[node]>>32) != noRank {
			b.three[r] = node
		}
	}
	for _, t := range toks {
		b.shorter[t.rank], _ = b.longest(t.bytes[:len(t.bytes)-1])
	}
	return b
}

// Bits of info: the token is the left part of a merge whose right part is
// a byte, or a longer token; the right part of one whose left part is a
// byte, or a longer token. Most pairs compatible asks about cannot merge,
// as one of them never merges on that side with a token of the other's
// kind, and these tell without a look at the pair table.
const (
	leftOfByte    = 1 << 56
	leftOfLonger  = 1 << 57
	rightOfByte   = 1 << 58
	rightOfLonger = 1 << 59
)

func packInfo(size int, left, right uint32) uint64 {
	return uint64(size) | uint64(left)<<8 | uint64(right)<<32
}

func tokSize(info uint64) int      { return int(info & 0xFF) }
func leftPart(info uint64) uint32  { return uint32(info>>8) & (1<<24 - 1) }
func rightPart(info uint64) uint32 { return uint32(info>>32) & (1<<24 - 1) }

type token struct {
	bytes string
	rank  uint32
}

// buildTrie builds the trie of toks (the bytes are in b.bytes already).
func (b *backtracker) buildTrie(toks []token) {
	slices.SortFunc(toks, func(x, y token) int { return strings.Compare(x.bytes, y.bytes) })
	type span struct {
		lo, hi, depth int // toks[lo:hi] share their first depth bytes
	}
	term := []uint32{noRank} // of each node
	first := []uint32{}
	b.label = append(b.label[:0], 0)
	queue := []span{{0, len(toks), 0}}
	for q := 0; q < len(queue); q++ {
		s := queue[q]
		first = append(first, uint32(len(term)))
		lo := s.lo
		if lo < s.hi && len(toks[lo].bytes) == s.depth {
			lo++ // the token this node spells, sorted first
		}
		for lo < s.hi {
			c := toks[lo].bytes[s.depth]
			hi := lo + 1
			for hi < s.hi && toks[hi].bytes[s.depth] == c {
				hi++
			}
			child := len(term)
			t := uint32(noRank)
			if len(toks[lo].bytes) == s.depth+1 {
				t = toks[lo].rank
			}
			term = append(term, t)
			b.label = append(b.label, c)
			if s.depth == 1 {
				b.two[uint16(toks[lo].bytes[0])<<8|uint16(c)] = uint32(child)
			}
			queue = append(queue, span{lo, hi, s.depth + 1})
			lo = hi
		}
	}
	first = append(first, uint32(len(term)))
	b.label = append(b.label, make([]byte, 8)...)
	b.nodes = make([]uint64, len(first))
	for i := range first {
		t := uint32(noRank)
		if i < len(term) {
			t = term[i]
		}
		b.nodes[i] = uint64(first[i]) | uint64(t)<<32
	}
}

// child returns the child of node by byte c, or 0. It compares c with 8
// of the children's bytes at once.
func (b *backtracker) child(node uint32, c byte) uint32 {
	const ones, highs = 0x0101010101010101, 0x8080808080808080
	lo, hi := uint32(b.nodes[node]), uint32(b.nodes[node+1])
	want := uint64(c) * ones
	for i := lo; i < hi; i += 8 {
		w := binary.LittleEndian.Uint64(b.label[i:i+8]) ^ want
		// The lowest bit set marks the first byte of w that is zero.
		if z := (w - ones) &^ w & highs; z != 0 {
			if k := i + uint32(bits.TrailingZeros64(z)/8); k < hi {
				return k
			}
			return 0
		}
	}
	return 0
}

// longest returns the longest token that p (not empty) starts with and
// its length.
func (b *backtracker) longest(p string) (rank uint32, n int) {
	if c := p[0]; c >= 0xE0 && c < 0xF0 && len(p) >= 3 && p[1]&0xC0 == 0x80 && p[2]&0xC0 == 0x80 {
		// A three-byte rune (overlong forms and surrogates have no node).
		if node := b.three[rune3(p)]; node != 0 {
			return b.walk(p, node, 3)
		}
	}
	if len(p) < 2 {
		return b.bytes[p[0]], 1
	}
	node := b.two[uint16(p[0])<<8|uint16(p[1])]
	if node == 0 {
		return b.bytes[p[0]], 1
	}
	return b.walk(p, node, 2)
}

// walk goes on from node, d bytes into p, and returns the longest token
// found on the way or, if none, the first byte.
func (b *backtracker) walk(p string, node uint32, d int) (rank uint32, n int) {
	rank, n = b.bytes[p[0]], 1
	for ; ; d++ {
		if t := uint32(b.nodes[node] >> 32); t != noRank {
			rank, n = t, d
		}
		if d == len(p) {
			return rank, n
		}
		if node = b.child(node, p[d]); node == 0 {
			return rank, n
		}
	}
}

// compatible reports whether tokens x and y, one after the other, are how
// merging their bytes alone ends.
func (b *backtracker) compatible(x uint32, ix uint64, y uint32, iy uint64) bool {
	limit := uint32(noRank) // parts meeting now meet until a merge of this rank
	for {
		xByte, yByte := tokSize(ix) == 1, tokSize(iy) == 1
		if xByte && yByte { // a two-byte union: the pair table
			return b.pairs[leftPart(ix)<<8|leftPart(iy)] >= limit
		}
		lx, ry := uint64(leftOfLonger), uint64(rightOfLonger)
		if yByte {
			lx = leftOfByte
		}
		if xByte {
			ry = rightOfByte
		}
		if ix&lx != 0 && iy&ry != 0 {
			if u := b.merged.get(x, y); u < limit {
				return false // they would merge first
			}
		}
		if !xByte && (yByte || x > y) { // x was merged last: undo it
			limit, x = x, rightPart(ix)
			ix = b.info[x]
		} else {
			// Undo y. A union of its own rank across the boundary merges
			// before it too: the same bytes, further left.
			limit, y = y+1, leftPart(iy)
			iy = b.info[y]
		}
	}
}

// count returns the number of tokens of p, using sc's buffers; ok is false
// once the search has tried more than perByte candidates for each byte it
// has got past (and 16 more), when the deadline (if not zero) has passed,
// or if it failed, which the facts above rule out.
func (b *backtracker) count(p string, sc *largeScratch, perByte int, deadline time.Time) (n int, ok bool) {
	stack := sc.stack[:0]
	defer func() { sc.stack = stack[:0] }()
	if words := len(p)/64 + 1; cap(sc.dead) < words {
		sc.dead = make([]uint64, words)
	} else {
		sc.dead = sc.dead[:words]
		clear(sc.dead)
	}
	dead := sc.dead // a bit for each position no encoding has a boundary at
	pos := 0
	var top uint64 // info of the last token on the stack
	tok, _ := b.longest(p)
	for tries := 1; ; tries++ {
		if tries > perByte*(pos+16) {
			return 0, false // stepping back again and again: let the merge count it
		}
		if tries%deadlineTries == 0 && !deadline.IsZero() && time.Now().After(deadline) {
			return 0, false
		}
		it := b.info[tok]
		end := pos + tokSize(it)
		if dead[end/64]&(1<<(end%64)) == 0 && (len(stack) == 0 || b.compatible(stack[len(stack)-1], top, tok, it)) {
			stack = append(stack, tok)
			top = it
			if end == len(p) {
				return len(stack), true
			}
			pos = end
			tok, _ = b.longest(p[pos:])
			continue
		}
		if s := b.shorter[tok]; s != noRank {
			tok = s
			continue
		}
		// No token fits at pos: no encoding has a boundary there.
		if len(stack) == 0 {
			return 0, false
		}
		dead[pos/64] |= 1 << (pos % 64)
		tok = stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		pos -= tokSize(b.info[tok])
		if len(stack) > 0 {
			top = b.info[stack[len(stack)-1]]
		}
	}
}

// backtrackWork bounds the candidates count may try per byte of progress.
// Text of any script needs fewer than one (about one a token); long runs
// of one punctuation mark need ten or more and merge faster, and a text
// built to make the search step back again and again is left to the merge
// too, whose cost does not depend on the text. So count gives up early.
const backtrackWork = 4

// deadlineTries is how many candidates count tries between looks at the
// clock: about 100 µs of work.
const deadlineTries = 1 << 10

// pairTable maps two ranks to the rank of the token last merged from
// them: open addressing, a slot a uint64 (left<<40 | right<<20 | rank+1;
// 0 empty), ranks below 2^20. Nearly every pair compatible asks about is
// not there, and a Bloom filter of a word per pair and about 20 bits per
// entry, small enough to stay in a core's cache, turns away 99% of them.
type pairTable struct {
	slots  []uint64
	mask   uint64
	filter []uint64
}

func newPairTable(n int) pairTable {
	size := uint64(1)
	for size*4 < uint64(n)*5 { // at most 80% full
		size <<= 1
	}
	words := uint64(1)
	for words*64 < uint64(n)*16 {
		words <<= 1
	}
	return pairTable{slots: make([]uint64, size), mask: size - 1, filter: make([]uint64, words)}
}

// bits returns the filter word and the two bits in it of a pair's hash.
func (t pairTable) bits(h uint64) (word uint64, bits uint64) {
	return h >> 32 & uint64(len(t.filter)-1), 1<<(h>>20&63) | 1<<(h>>26&63)
}

func pairHash(x, y uint32) uint64 {
	h := (uint64(x)<<20 | uint64(y)) * 0x9E3779B97F4A7C15
	return h ^ h>>31
}

func (t pairTable) put(x, y, r uint32) {
	h := pairHash(x, y)
	w, bits := t.bits(h)
	t.filter[w] |= bits
	i := h & t.mask
	for t.slots[i] != 0 {
		i = (i + 1) & t.mask
	}
	t.slots[i] = uint64(x)<<40 | uint64(y)<<20 | uint64(r+1)
}

// get returns the rank of the token merged from x and y, or noRank.
func (t pairTable) get(x, y uint32) uint32 {
	h := pairHash(x, y)
	if w, bits := t.bits(h); t.filter[w]&bits != bits {
		return noRank
	}
	key := uint64(x)<<40 | uint64(y)<<20
	for i := h & t.mask; ; i = (i + 1) & t.mask {
		s := t.slots[i]
		if s == 0 {
			return noRank
		}
		if s&^(1<<20-1) == key {
			return uint32(s&(1<<20-1)) - 1
		}
	}
}

// slowMergeLast merges tok by rank, as mergeSmallLast does for any length
// in O(n²): for the few tokens longer than smallPiece, once.
func slowMergeLast(tok string, rank func(string) uint32) (parts, mid int) {
	starts := make([]int, 0, len(tok)+1)
	for i := range len(tok) + 1 {
		starts = append(starts, i)
	}
	for len(starts) > 2 {
		best, at := uint32(noRank), -1
		for k := 0; k+2 < len(starts); k++ {
			if r := rank(tok[starts[k]:starts[k+2]]); r < best {
				best, at = r, k
			}
		}
		if at < 0 {
			break
		}
		mid = starts[at+1]
		starts = slices.Delete(starts, at+1, at+2)
	}
	return len(starts) - 1, mid
}
