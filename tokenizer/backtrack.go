package tokenizer

import (
	"slices"
	"strings"
)

// backtracker counts the tokens of a long piece in time linear in its
// length, where merging costs O(n log n) and several rank lookups a byte.
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
//     token before the merge that ends their meeting. This needs every
//     token's parts to rank below it, so that merges happen in rank order;
//     newBacktracker checks that the vocabulary is so.
//
// Counting then goes greedily: at each position take the longest token
// that is compatible with the one before it, try shorter ones when it is
// not, and step back when none is; a position from which no continuation
// exists is remembered, so each is given up once. Most of the time the
// longest token is the right one.
type backtracker struct {
	size  []uint8  // of each rank's token, in bytes
	left  []uint32 // the two parts each token is last merged from; a byte's are itself
	right []uint32
	// shorter is the longest token, other than itself, that a token starts
	// with (noRank for a byte): the next candidate when a token does not fit.
	shorter []uint32
	merged  pairTable

	// A trie of the tokens finds the longest one a text starts with. Nodes
	// are numbered breadth first, so the children of node i are the nodes
	// first[i] to first[i+1]-1, in the order of their bytes.
	bytes [256]uint32 // rank of each byte
	two   []uint32    // node of each two-byte start, 0 if no token starts so
	term  []uint32    // rank of the token a node spells, or noRank
	first []uint32
	label []byte // the byte that leads to a node
}

// newBacktracker indexes the vocabulary ranks, merging each token with
// merge (which returns the number of parts and where the last merge joined
// two of them) to learn its parts. It returns nil when the vocabulary
// breaks the rules the backtracker relies on (it never does for
// cl100k_base and o200k_base; see TestBacktracker).
func newBacktracker(ranks map[string]int, merge func(string) (parts, mid int), rank func(string) uint32) *backtracker {
	n := 0
	for _, r := range ranks {
		n = max(n, r+1)
	}
	b := &backtracker{
		size:    make([]uint8, n),
		left:    make([]uint32, n),
		right:   make([]uint32, n),
		shorter: make([]uint32, n),
		two:     make([]uint32, 1<<16),
	}
	toks := make([]token, 0, len(ranks))
	for tok, r := range ranks {
		if len(tok) == 0 || len(tok) > 255 {
			return nil
		}
		b.size[r] = uint8(len(tok))
		b.shorter[r] = noRank
		if len(tok) == 1 {
			b.bytes[tok[0]] = uint32(r)
			b.left[r], b.right[r] = uint32(r), uint32(r)
			continue
		}
		// A token that merging its own bytes does not reach can never be
		// part of an encoding: it stays out of the trie.
		parts, mid := merge(tok)
		if parts != 1 {
			continue
		}
		l, rt := rank(tok[:mid]), rank(tok[mid:])
		if l >= uint32(r) && mid > 1 || rt >= uint32(r) && len(tok)-mid > 1 {
			return nil // a part ranks above its token: merges are not in rank order
		}
		b.left[r], b.right[r] = l, rt
		toks = append(toks, token{tok, uint32(r)})
	}
	b.merged = newPairTable(len(toks))
	for _, t := range toks {
		b.merged.put(b.left[t.rank], b.right[t.rank], t.rank)
	}
	b.buildTrie(toks)
	for _, t := range toks {
		b.shorter[t.rank], _ = b.longest(t.bytes[:len(t.bytes)-1])
	}
	return b
}

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
	b.term = append(b.term[:0], noRank)
	b.label = append(b.label[:0], 0)
	b.first = b.first[:0]
	queue := []span{{0, len(toks), 0}}
	for q := 0; q < len(queue); q++ {
		s := queue[q]
		b.first = append(b.first, uint32(len(b.term)))
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
			child := len(b.term)
			t := uint32(noRank)
			if len(toks[lo].bytes) == s.depth+1 {
				t = toks[lo].rank
			}
			b.term = append(b.term, t)
			b.label = append(b.label, c)
			if s.depth == 1 {
				b.two[uint16(toks[lo].bytes[0])<<8|uint16(c)] = uint32(child)
			}
			queue = append(queue, span{lo, hi, s.depth + 1})
			lo = hi
		}
	}
	b.first = append(b.first, uint32(len(b.term)))
}

// child returns the child of node by byte c, or 0.
func (b *backtracker) child(node uint32, c byte) uint32 {
	lo, hi := b.first[node], b.first[node+1]
	for hi-lo > 8 { // many children: binary search
		m := lo + (hi-lo)/2
		if b.label[m] < c {
			lo = m + 1
		} else {
			hi = m + 1
		}
	}
	for ; lo < hi; lo++ {
		if b.label[lo] == c {
			return lo
		}
	}
	return 0
}

// longest returns the longest token that p (not empty) starts with and
// its length.
func (b *backtracker) longest(p string) (rank uint32, n int) {
	rank, n = b.bytes[p[0]], 1
	if len(p) < 2 {
		return rank, n
	}
	node := b.two[uint16(p[0])<<8|uint16(p[1])]
	if node == 0 {
		return rank, n
	}
	for d := 2; ; d++ {
		if t := b.term[node]; t != noRank {
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
func (b *backtracker) compatible(x, y uint32) bool {
	limit := uint32(noRank) // parts meeting now meet until a merge of this rank
	for {
		if u := b.merged.get(x, y); u < limit {
			return false // they would merge first
		}
		xByte, yByte := b.size[x] == 1, b.size[y] == 1
		switch {
		case xByte && yByte:
			return true
		case !xByte && (yByte || x > y): // x was merged last: undo it
			limit, x = x, b.right[x]
		default:
			// Undo y. A union of its own rank across the boundary merges
			// before it too: the same bytes, further left.
			limit, y = y+1, b.left[y]
		}
	}
}

// count returns the number of tokens of p, using sc's buffers; ok is false
// if the search tried more than work candidates, or failed, which the
// facts above rule out.
func (b *backtracker) count(p string, sc *largeScratch, work int) (n int, ok bool) {
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
	tok, _ := b.longest(p)
	for ; ; work-- {
		if work <= 0 {
			return 0, false // a hostile text: let the merge count it
		}
		end := pos + int(b.size[tok])
		if dead[end/64]&(1<<(end%64)) == 0 && (len(stack) == 0 || b.compatible(stack[len(stack)-1], tok)) {
			stack = append(stack, tok)
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
		pos -= int(b.size[tok])
	}
}

// backtrackWork bounds the candidates count may try, per byte of a piece.
// Text needs about one; a text built to make the search step back again
// and again is left to the merge, whose cost does not depend on the text.
const backtrackWork = 16

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
