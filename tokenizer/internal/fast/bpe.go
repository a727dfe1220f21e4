package fast

import (
	"fmt"
	"math"
	"sync"
	"time"
	"unicode/utf8"

	tiktokenloader "github.com/pkoukk/tiktoken-go-loader"
)

// encodingFiles names the BPE rank files as tiktoken-go asks its loader for
// them; the offline loader serves them from its embedded copies.
var encodingFiles = map[string]string{
	"cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
	"o200k_base":  "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}

// Encoding counts tokens without building them: a hand-written
// pre-tokenizer (split.go) and byte-pair merging by rank that only counts
// the parts left. It returns exactly what tiktoken-go's EncodeOrdinary
// returns the length of. It is read-only once built (Load builds each
// encoding once per process) and safe for concurrent use.
type Encoding struct {
	split func(s string, i int) int
	ranks *rankTable
	// pairs holds the rank of every two-byte token, noRank for the pairs
	// that are not tokens: the first merges of a piece look here.
	pairs *[1 << 16]uint32
	// longest is the length of the longest token: no longer union has a
	// rank, which spares hashing it.
	longest int
	// scratch holds the buffers for pieces too long for the stack.
	scratch sync.Pool // of *largeScratch
	memos   sync.Pool // of *memo
	bt      *backtracker
	cuts    *cuts
}

const noRank = math.MaxUint32

func newEncoding(name string) (*Encoding, error) {
	file, ok := encodingFiles[name]
	if !ok {
		return nil, fmt.Errorf("no fast path for %s", name)
	}
	loaded, err := tiktokenloader.NewOfflineLoader().LoadTiktokenBpe(file)
	if err != nil {
		return nil, fmt.Errorf("load %s ranks: %w", name, err)
	}
	e := &Encoding{
		split: splitCL100K,
		ranks: newRankTable(loaded),
		pairs: new([1 << 16]uint32),
	}
	e.memos.New = func() any { return new(memo) }
	e.scratch.New = func() any { return new(largeScratch) }
	if name == "o200k_base" {
		e.split = splitO200K
	}
	for i := range e.pairs {
		e.pairs[i] = noRank
	}
	for tok, rank := range loaded {
		e.longest = max(e.longest, len(tok))
		if len(tok) == 2 {
			e.pairs[uint16(tok[0])<<8|uint16(tok[1])] = uint32(rank)
		}
	}
	for b := range 256 {
		if e.ranks.get(string([]byte{byte(b)})) == noRank {
			return nil, fmt.Errorf("%s ranks lack byte %#x", name, b)
		}
	}
	e.bt = newBacktracker(loaded, e.pairs, e.mergeLast, e.ranks.get)
	if e.bt != nil && e.bt.unreached == 0 {
		// Cuts count a stretch that is a token as one, which is what
		// merging its bytes gives only if every token is so reached.
		e.cuts = newCuts(loaded, e.mergeSmall)
	}
	return e, nil
}

// mergeLast merges a token's bytes for newBacktracker: the parts left and
// where the last merge joined two of them.
func (e *Encoding) mergeLast(tok string) (parts, mid int) {
	if len(tok) <= smallPiece {
		return e.mergeSmallLast(tok)
	}
	return slowMergeLast(tok, e.ranks.get)
}

// Count returns the number of tokens in s, stopping at a piece boundary
// once the deadline (when not zero) has passed; covered is how much of s the
// tokens are of.
func (e *Encoding) Count(s string, deadline time.Time) (tokens, covered int) {
	orig := len(s)
	if !utf8.ValidString(s) {
		// tiktoken-go matches on runes: each invalid byte becomes U+FFFD.
		s = string([]rune(s))
	}
	m := e.memos.Get().(*memo)
	defer e.memos.Put(m)
	m.next()
	check := deadlineEvery
	i := 0
	for i < len(s) {
		if !deadline.IsZero() && i >= check {
			if time.Now().After(deadline) {
				break
			}
			check = i + deadlineEvery
		}
		j := e.split(s, i)
		if j <= i { // cannot happen; never loop forever if it does
			_, n := utf8.DecodeRuneInString(s[i:])
			j = i + n
		}
		if j-i == 1 {
			tokens++
			i = j
			continue
		}
		p := s[i:j]
		head, h := headHash(p)
		n, ok := m.get(s, p, head, h)
		if !ok {
			if n, ok = e.pieceTokens(p, head, h, deadline); !ok {
				break
			}
			m.put(i, p, head, h, n)
		}
		tokens += n
		i = j
	}
	if i == len(s) {
		return tokens, orig
	}
	return tokens, int(int64(i) * int64(orig) / int64(len(s)))
}

// countAll returns the number of tokens in s.
func (e *Encoding) countAll(s string) int {
	n, _ := e.Count(s, time.Time{})
	return n
}

// deadlineEvery is how many bytes Count goes between looks at the clock.
const deadlineEvery = 16 << 10

// pieceTokens returns the number of tokens of one pre-tokenizer piece; ok
// is false when the deadline passed before a long piece was merged. A
// piece of Chinese, Japanese or Korean is cut where no token can cross
// (cuts.go) and its stretches counted apart.
func (e *Encoding) pieceTokens(p string, head, h uint64, deadline time.Time) (n int, ok bool) {
	if len(p) <= e.longest && e.ranks.getHashed(p, head, h) != noRank {
		return 1, true
	}
	if e.cuts != nil && len(p) > 6 && len(p) <= maxBacktrack && threeByte(p) {
		if n, ok, uncut := e.cutTokens(p, deadline); !uncut {
			return n, ok
		}
	}
	return e.mergeTokens(p, deadline)
}

// mergeTokens returns the number of tokens of piece p, which is not a
// token itself.
func (e *Encoding) mergeTokens(p string, deadline time.Time) (n int, ok bool) {
	if e.bt != nil && (len(p) > btMin || len(p) > 6 && threeByte(p)) && len(p) <= maxBacktrack {
		sc := e.scratch.Get().(*largeScratch)
		n, ok := e.bt.count(p, sc, backtrackWork, deadline)
		e.scratch.Put(sc)
		if ok {
			return n, true
		}
		if !deadline.IsZero() && time.Now().After(deadline) {
			return 0, false
		}
	}
	if len(p) <= smallPiece {
		return e.mergeSmall(p), true
	}
	if !deadline.IsZero() && len(p) > maxBudgetPiece {
		return 0, false
	}
	return e.mergeLarge(p, deadline)
}

// memo remembers the token counts of the pieces of one text: words,
// punctuation and indentation recur, and a hit costs less than a rank
// lookup. Its slots are tagged with the text's generation, so a new text
// starts with an empty memo without clearing it, and they hold an offset
// into the text rather than the text, so that a pooled memo keeps no text
// alive.
type memo struct {
	gen   uint32
	slots [memoSlots]memoSlot
}

// memoSlot is 16 bytes, so that the memo fits a core's first-level cache.
type memoSlot struct {
	head uint64 // the piece's first 8 bytes, as headHash returns them
	off  uint32 // where the piece starts in the text
	// meta is the text's generation (the top 10 bits), the piece's
	// length and its count (11 bits each: both are at most maxMemoPiece).
	meta uint32
}

// memoSlots is the memo's size: 32 KiB.
const memoSlots = 2048

// maxMemoPiece is the longest piece the memo keeps.
const maxMemoPiece = 1 << 10

// memoGens is how many texts the generation tells apart before the slots
// are cleared.
const memoGens = 1 << 10

// next starts a new text.
func (m *memo) next() {
	m.gen++
	if m.gen == memoGens { // wrapped: slots of the previous cycle may remain
		m.slots = [memoSlots]memoSlot{}
		m.gen = 1
	}
}

// get returns the count of piece p of text s, if the memo has it; head
// and h are p's headHash.
func (m *memo) get(s, p string, head, h uint64) (int, bool) {
	slot := &m.slots[(h>>48)%memoSlots]
	if len(p) <= maxMemoPiece && slot.meta>>11 == m.gen<<11|uint32(len(p)) && slot.head == head &&
		(len(p) <= 8 || s[slot.off+8:int(slot.off)+len(p)] == p[8:]) {
		return int(slot.meta & (1<<11 - 1)), true
	}
	return 0, false
}

// put remembers that the piece p at offset i of the text has n tokens.
func (m *memo) put(i int, p string, head, h uint64, n int) {
	if len(p) <= maxMemoPiece && i <= math.MaxUint32-maxMemoPiece { // off fits
		m.slots[(h>>48)%memoSlots] = memoSlot{head: head, off: uint32(i), meta: m.gen<<22 | uint32(len(p))<<11 | uint32(n)}
	}
}

// threeByte reports whether p starts with a rune of three bytes, after at
// most one byte (a space or a mark): Chinese, Japanese or Korean, whose
// pieces of a few characters the backtracker counts in about half the time
// merging takes.
func threeByte(p string) bool {
	return p[0] >= 0xE0 && p[0] < 0xF0 || p[1] >= 0xE0 && p[1] < 0xF0
}

// maxBudgetPiece is the longest piece merged under a deadline: a longer
// unbroken run (of letters, punctuation or spaces) is hostile rather than
// text, and costs tens of milliseconds before the first look at the clock.
const maxBudgetPiece = 256 << 10

// rank returns the rank of p[a:b], or noRank.
func (e *Encoding) rank(p string, a, b int) uint32 {
	if b-a == 2 {
		return e.pairs[uint16(p[a])<<8|uint16(p[a+1])]
	}
	if b-a > e.longest {
		return noRank
	}
	return e.ranks.get(p[a:b])
}

// smallPiece is the longest piece merged on the stack by repeated scans,
// which cost O(n²) but beat a heap for short pieces.
const smallPiece = 64

// btMin is the length above which a piece is counted by the backtracker,
// and at most maxBacktrack: shorter pieces merge faster on the stack (but
// for those of more than 6 bytes that threeByte reports), longer ones
// under mergeLarge's looks at the clock.
const (
	btMin        = 12
	maxBacktrack = 1 << 16
)

// mergeSmall is tiktoken's byte-pair merge: repeatedly join the adjacent
// parts whose union has the lowest rank, the leftmost on ties, until no
// union is a token.
func (e *Encoding) mergeSmall(p string) int {
	parts, _ := e.mergeSmallLast(p)
	return parts
}

// mergeSmallLast is mergeSmall that also returns where the last merge
// joined two parts (0 if there was none). Parts are named by the byte they
// start at: next[k] is where the part after part k starts (len(p) for the
// last part), rank[k] the rank of the two joined. A merge relinks rather
// than moves, and each step scans the parts left in order.
func (e *Encoding) mergeSmallLast(p string) (parts, last int) {
	var next [smallPiece + 1]uint8
	var rank [smallPiece]uint32
	n := len(p)
	for k := 0; k < n; k++ {
		next[k] = uint8(k + 1)
		rank[k] = noRank
		if k+1 < n {
			rank[k] = e.pairs[uint16(p[k])<<8|uint16(p[k+1])]
		}
	}
	next[n] = uint8(n)
	parts = n
	for parts > 1 {
		best, at, before := uint32(noRank), -1, -1
		for k, pk := 0, -1; k < n; pk, k = k, int(next[k]) {
			if rank[k] < best {
				best, at, before = rank[k], k, pk
			}
		}
		if at < 0 {
			break
		}
		// Join part at and the next one, then re-rank the unions that
		// changed: at's with the part after, and the part before's with at.
		gone := int(next[at])
		last = gone
		next[at] = next[gone]
		parts--
		if after := int(next[at]); after < n {
			rank[at] = e.rank(p, at, int(next[after]))
		} else {
			rank[at] = noRank
		}
		if before >= 0 {
			rank[before] = e.rank(p, before, int(next[at]))
		}
	}
	return parts, last
}

// largeScratch holds mergeLarge's buffers between calls.
type largeScratch struct {
	next, prev []int32  // linked list of parts by start byte
	rank       []uint32 // rank of the union of a part and the next
	heap       []heapItem
	stack      []uint32 // backtracker.count's tokens
	dead       []uint64 // backtracker.count's positions without a boundary
}

type heapItem struct {
	rank  uint32
	start int32
}

func (a heapItem) less(b heapItem) bool {
	return a.rank < b.rank || a.rank == b.rank && a.start < b.start
}

// mergeLarge merges as mergeSmall does, in O(n log n): the candidate unions
// sit in a heap ordered by rank and then position, which picks the same
// union the scan would (the lowest rank, the leftmost on ties); entries that
// a merge made stale are skipped when popped. A piece of a megabyte takes
// on the order of 100 ms, so mergeLarge looks at the deadline (when not
// zero) as it goes and gives up (ok false) once it has passed.
func (e *Encoding) mergeLarge(p string, deadline time.Time) (parts int, ok bool) {
	n := len(p)
	sc := e.scratch.Get().(*largeScratch)
	if n <= maxBudgetPiece {
		defer e.scratch.Put(sc) // larger buffers are not kept
	}
	sc.next = grow(sc.next, n)
	sc.prev = grow(sc.prev, n)
	sc.rank = growRank(sc.rank, n)
	sc.heap = sc.heap[:0]
	next, prev, rank := sc.next, sc.prev, sc.rank
	for k := range n {
		next[k] = int32(k + 1)
		prev[k] = int32(k - 1)
		rank[k] = noRank
		if k+1 < n {
			rank[k] = e.pairs[uint16(p[k])<<8|uint16(p[k+1])]
			if rank[k] != noRank {
				sc.heap = append(sc.heap, heapItem{rank[k], int32(k)})
			}
		}
	}
	h := sc.heap
	for i := len(h)/2 - 1; i >= 0; i-- {
		down(h, i)
	}
	parts = n
	end := func(k int32) int32 { // end of the part after k, or n
		if nk := next[k]; nk < int32(n) {
			return next[nk]
		}
		return int32(n)
	}
	for pops := 1; len(h) > 0; pops++ {
		if pops%mergeDeadlineEvery == 0 && !deadline.IsZero() && time.Now().After(deadline) {
			sc.heap = h[:0]
			return 0, false
		}
		top := h[0]
		last := len(h) - 1
		h[0] = h[last]
		h = h[:last]
		if len(h) > 0 {
			down(h, 0)
		}
		k := top.start
		if prev[k] == -2 || rank[k] != top.rank || next[k] >= int32(n) {
			continue // stale: k was merged away or its union changed
		}
		// Join part k and the next one.
		gone := next[k]
		next[k] = next[gone]
		if next[gone] < int32(n) {
			prev[next[gone]] = k
		}
		prev[gone] = -2
		rank[gone] = noRank
		parts--
		if next[k] < int32(n) {
			rank[k] = e.rank(p, int(k), int(end(k)))
			if rank[k] != noRank {
				h = push(h, heapItem{rank[k], k})
			}
		} else {
			rank[k] = noRank
		}
		if pk := prev[k]; pk >= 0 {
			rank[pk] = e.rank(p, int(pk), int(next[k]))
			if rank[pk] != noRank {
				h = push(h, heapItem{rank[pk], pk})
			}
		}
	}
	sc.heap = h[:0]
	return parts, true
}

// mergeDeadlineEvery is how many merges mergeLarge makes between looks at
// the clock.
const mergeDeadlineEvery = 1 << 14

func grow(s []int32, n int) []int32 {
	if cap(s) < n {
		return make([]int32, n)
	}
	return s[:n]
}

func growRank(s []uint32, n int) []uint32 {
	if cap(s) < n {
		return make([]uint32, n)
	}
	return s[:n]
}

func down(h []heapItem, i int) {
	for {
		l := 2*i + 1
		if l >= len(h) {
			return
		}
		m := l
		if r := l + 1; r < len(h) && h[r].less(h[l]) {
			m = r
		}
		if !h[m].less(h[i]) {
			return
		}
		h[i], h[m] = h[m], h[i]
		i = m
	}
}

func push(h []heapItem, x heapItem) []heapItem {
	h = append(h, x)
	i := len(h) - 1
	for i > 0 {
		parent := (i - 1) / 2
		if !h[i].less(h[parent]) {
			break
		}
		h[i], h[parent] = h[parent], h[i]
		i = parent
	}
	return h
}
