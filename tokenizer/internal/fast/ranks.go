package fast

// rankTable maps token bytes to ranks: an open-addressing hash table whose
// slots hold each key's first eight bytes, so that most lookups touch one
// cache line and no pointer, several times faster than a Go map for the
// short keys byte-pair merging asks for. Longer keys keep the rest of their
// bytes in one arena.
type rankTable struct {
	arena []byte
	slots []rankSlot
	mask  uint64
	// short holds every token of up to 4 bytes again, 8 bytes a slot: a
	// table small enough to stay in a core's cache answers the lookups of
	// short unions, most of those byte-pair merging makes, without a trip
	// to main memory, whether the union is a token or not.
	short     []uint64 // key | length<<32 | rank<<40; 0: empty
	shortMask uint64
	// filter is a Bloom filter of the longer tokens, about 16 bits per
	// token and small enough to stay in cache: most unions byte-pair
	// merging asks about are not tokens, and it turns nearly all of those
	// away before the table is touched.
	filter     []uint64
	filterMask uint64 // of bit indexes
}

type rankSlot struct {
	head uint64 // the key's first 8 bytes, little-endian, zero-padded
	rank uint32
	// meta is the key's length in the low 8 bits (0: empty slot) and the
	// offset of its bytes past the eighth in arena above them.
	meta uint32
}

func newRankTable(ranks map[string]int) *rankTable {
	size := uint64(1)
	for size*4 < uint64(len(ranks))*5 { // at most 80% full
		size <<= 1
	}
	t := &rankTable{slots: make([]rankSlot, size), mask: size - 1}
	shortSize, nShort := uint64(1), 0
	for tok := range ranks {
		if len(tok) <= 4 {
			nShort++
		}
	}
	for shortSize < uint64(nShort)*2 {
		shortSize <<= 1
	}
	t.short, t.shortMask = make([]uint64, shortSize), shortSize-1
	filterBits := uint64(64)
	for filterBits < uint64(len(ranks)-nShort)*16 {
		filterBits <<= 1
	}
	t.filter, t.filterMask = make([]uint64, filterBits/64), filterBits-1
	for tok, rank := range ranks {
		if len(tok) > 0 && len(tok) <= 4 {
			k := shortKey(tok)
			i := shortHash(k) & t.shortMask
			for t.short[i] != 0 {
				i = (i + 1) & t.shortMask
			}
			t.short[i] = k | uint64(rank)<<40
		}
	}
	for tok, rank := range ranks {
		if len(tok) == 0 || len(tok) > 255 || len(t.arena) >= 1<<24 {
			panic("fast: token outside the rank table's limits")
		}
		head, h := headHash(tok)
		i := h & t.mask
		for t.slots[i].meta != 0 {
			i = (i + 1) & t.mask
		}
		t.slots[i] = rankSlot{head: head, rank: uint32(rank), meta: uint32(len(t.arena))<<8 | uint32(len(tok))}
		if len(tok) > 8 {
			t.arena = append(t.arena, tok[8:]...)
		}
		if len(tok) > 4 {
			w, b := t.filterWord(h)
			t.filter[w] |= b
		}
	}
	return t
}

// get returns the rank of key, or noRank. Keys longer than 255 bytes are
// never tokens.
func (t *rankTable) get(key string) uint32 {
	if len(key) <= 4 {
		return t.getShort(key)
	}
	if len(key) > 255 {
		return noRank
	}
	head, h := headHash(key)
	return t.getHashed(key, head, h)
}

// getHashed is get for a key whose headHash is head and h.
func (t *rankTable) getHashed(key string, head, h uint64) uint32 {
	if len(key) <= 4 {
		return t.getShortKey(head | uint64(len(key))<<32)
	}
	if len(key) > 255 {
		return noRank
	}
	if w, b := t.filterWord(h); t.filter[w]&b != b {
		return noRank
	}
	n := uint32(len(key))
	for i := h & t.mask; ; i = (i + 1) & t.mask {
		s := &t.slots[i]
		if s.meta == 0 {
			return noRank
		}
		if s.head != head || s.meta&0xFF != n {
			continue
		}
		if n <= 8 {
			return s.rank
		}
		off := s.meta >> 8
		if string(t.arena[off:off+n-8]) == key[8:] {
			return s.rank
		}
	}
}

// filterWord returns the filter's word and three bits in it for a key of
// hash h, each from bits of the hash that neither the word (bits 40 up)
// nor the table slot (the low bits) uses: one cache line a lookup.
func (t *rankTable) filterWord(h uint64) (word int, bits uint64) {
	return int(h >> 40 & (t.filterMask >> 6)), 1<<(h>>58) | 1<<(h>>26&63) | 1<<(h>>20&63)
}

// getShort is get for keys of 1 to 4 bytes.
func (t *rankTable) getShort(key string) uint32 { return t.getShortKey(shortKey(key)) }

// getShortKey is getShort for a key packed by shortKey.
func (t *rankTable) getShortKey(k uint64) uint32 {
	for i := shortHash(k) & t.shortMask; ; i = (i + 1) & t.shortMask {
		s := t.short[i]
		if s == 0 {
			return noRank
		}
		if s&(1<<40-1) == k {
			return uint32(s >> 40)
		}
	}
}

// shortKey packs a key of up to 4 bytes and its length.
func shortKey(s string) uint64 { return loadTail(s) | uint64(len(s))<<32 }

func shortHash(k uint64) uint64 {
	k *= 0x9E3779B97F4A7C15
	return k ^ k>>32
}

// headHash returns the first eight bytes of s, little-endian and
// zero-padded, and a hash of all of s (multiply-xorshift rounds; not for
// hostile keys, but the table is built from the fixed vocabulary and a
// lookup of any text ends at the first empty slot).
func headHash(s string) (head, h uint64) {
	const m = 0x9E3779B97F4A7C15
	h = uint64(len(s)) * m
	if len(s) >= 8 {
		head = load64(s)
		for r := s[8:]; len(r) > 0; {
			var w uint64
			if len(r) >= 8 {
				w, r = load64(r), r[8:]
			} else {
				w, r = loadTail(r), ""
			}
			h = (h ^ w) * m
			h ^= h >> 32
		}
	} else {
		head = loadTail(s)
	}
	h = (h ^ head) * m
	h ^= h >> 29
	h *= 0xBF58476D1CE4E5B9
	h ^= h >> 32
	return head, h
}

func load64(s string) uint64 {
	_ = s[7]
	return uint64(s[0]) | uint64(s[1])<<8 | uint64(s[2])<<16 | uint64(s[3])<<24 |
		uint64(s[4])<<32 | uint64(s[5])<<40 | uint64(s[6])<<48 | uint64(s[7])<<56
}

// loadTail loads the 0 to 7 bytes of s, little-endian, zero-padded, with
// two loads that may overlap (the bytes they share are the same).
func loadTail(s string) uint64 {
	switch n := len(s); {
	case n >= 4:
		lo := uint64(s[0]) | uint64(s[1])<<8 | uint64(s[2])<<16 | uint64(s[3])<<24
		t := s[n-4:]
		hi := uint64(t[0]) | uint64(t[1])<<8 | uint64(t[2])<<16 | uint64(t[3])<<24
		return lo | hi<<(8*(n-4))
	case n >= 2:
		t := s[n-2:]
		return uint64(s[0]) | uint64(s[1])<<8 | (uint64(t[0])|uint64(t[1])<<8)<<(8*(n-2))
	case n == 1:
		return uint64(s[0])
	}
	return 0
}
