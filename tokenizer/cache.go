package tokenizer

import (
	"hash/maphash"
	"sync"
	"sync/atomic"
)

// cache remembers the token counts of texts seen before, keyed by a 128-bit
// hash of their content (two 64-bit maphash values with independent seeds;
// a false hit needs a collision of both). It is bounded: each of its shards
// keeps two generations of at most limit/(2·shards) entries, moves a hit in
// the old generation to the new one, and drops the old generation when the
// new one is full, so that what is used stays and the rest ages out.
type cache struct {
	seeds  [2]maphash.Seed
	shards [cacheShards]cacheShard
	limit  int // entries per generation per shard
	hits   atomic.Uint64
	misses atomic.Uint64
}

const cacheShards = 16

type cacheKey [2]uint64

type cacheShard struct {
	mu       sync.Mutex
	cur, old map[cacheKey]int32
}

func newCache(entries int) *cache {
	c := &cache{
		seeds: [2]maphash.Seed{maphash.MakeSeed(), maphash.MakeSeed()},
		limit: max(entries/(2*cacheShards), 1),
	}
	for i := range c.shards {
		c.shards[i].cur = make(map[cacheKey]int32)
	}
	return c
}

func (c *cache) key(s string) cacheKey {
	return cacheKey{maphash.String(c.seeds[0], s), maphash.String(c.seeds[1], s)}
}

func (c *cache) shard(k cacheKey) *cacheShard { return &c.shards[k[0]%cacheShards] }

// get returns the count kept under k (from key), if any.
func (c *cache) get(k cacheKey) (int, bool) {
	sh := c.shard(k)
	sh.mu.Lock()
	n, ok := sh.cur[k]
	if !ok {
		if n, ok = sh.old[k]; ok {
			delete(sh.old, k)
			sh.add(k, n, c.limit)
		}
	}
	sh.mu.Unlock()
	if ok {
		c.hits.Add(1)
	} else {
		c.misses.Add(1)
	}
	return int(n), ok
}

// put keeps n under k.
func (c *cache) put(k cacheKey, n int) {
	sh := c.shard(k)
	sh.mu.Lock()
	sh.add(k, int32(min(n, 1<<31-1)), c.limit)
	sh.mu.Unlock()
}

func (sh *cacheShard) add(k cacheKey, n int32, limit int) {
	if len(sh.cur) >= limit {
		sh.old, sh.cur = sh.cur, make(map[cacheKey]int32, limit)
	}
	sh.cur[k] = n
}

func (c *cache) stats() (hits, misses uint64, entries int) {
	for i := range c.shards {
		sh := &c.shards[i]
		sh.mu.Lock()
		entries += len(sh.cur) + len(sh.old)
		sh.mu.Unlock()
	}
	return c.hits.Load(), c.misses.Load(), entries
}
