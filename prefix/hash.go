// Package prefix finds prompts that share a leading text, for prefix
// affinity: a Hasher hashes a prompt's leading blocks as its texts go by
// (in the same pass that counts their tokens), and a Table remembers which
// hosts recently served which prefix.
package prefix

import "hash/maphash"

// DefaultBlockBytes is the block of a prefix hash: about 128 tokens, a few
// of a backend's cache blocks.
const DefaultBlockBytes = 512

// Hashing says which of a prompt's leading blocks a Hasher hashes.
type Hashing struct {
	// Blocks is how many leading blocks are hashed; 0 hashes nothing.
	Blocks int
	// BlockBytes is a block's length; 0 means DefaultBlockBytes.
	BlockBytes int
	// Seed seeds the hashes: prompts hashed with the same Seed compare.
	// It must come from maphash.MakeSeed once Blocks is positive (a zero
	// Seed panics); route.New makes one per process.
	Seed maphash.Seed
}

// Hasher hashes the leading blocks of one request's texts, in the order the
// request lists them, each text followed by a separator byte. One hash runs
// over all of them and is read at the end of each block, so each block's
// hash covers every block before it: two prompts share a block's hash
// exactly when they start with the same texts up to its end. A last block
// that is not full is left out, as a backend's prefix cache leaves out its
// last partial block. The zero Hasher hashes nothing.
type Hasher struct {
	opts   Hashing
	h      maphash.Hash
	n      int // bytes in the current block
	hashes []uint64
}

// NewHasher returns a Hasher for one request, to be used in place (a
// Hasher that has been written to must not be copied).
func NewHasher(opts Hashing) Hasher {
	if opts.BlockBytes <= 0 {
		opts.BlockBytes = DefaultBlockBytes
	}
	return Hasher{opts: opts}
}

// Write adds one text of the request; an empty text adds nothing.
func (p *Hasher) Write(s string) {
	if s == "" || len(p.hashes) >= p.opts.Blocks {
		return
	}
	p.write(s)
	p.write("\x1e") // so that "ab" then "c" is not "a" then "bc"
}

func (p *Hasher) write(s string) {
	if p.n == 0 && p.hashes == nil { // nothing written yet
		p.h.SetSeed(p.opts.Seed)
	}
	for len(s) > 0 && len(p.hashes) < p.opts.Blocks {
		k := min(len(s), p.opts.BlockBytes-p.n)
		p.h.WriteString(s[:k])
		s, p.n = s[k:], p.n+k
		if p.n == p.opts.BlockBytes {
			p.hashes = append(p.hashes, p.h.Sum64())
			p.n = 0
		}
	}
}

// Sum returns the hash of each full leading block written, the ith covering
// blocks 0 to i; nil when none is full.
func (p *Hasher) Sum() []uint64 { return p.hashes }

// BlockBytes returns the hashed blocks' length.
func (p *Hasher) BlockBytes() int { return p.opts.BlockBytes }
