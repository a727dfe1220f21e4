package sim

import (
	"container/list"
	"context"
	"errors"
	"hash/fnv"
	"math"
	"math/rand/v2"
	"sync"
	"time"
)

// engine is a continuous-batching scheduler in the manner of vLLM: up to
// MaxNumSeqs sequences run at once, the rest wait in FIFO order; every step
// spends a token budget on one token for each decoding sequence and on
// chunks of pending prefill, and takes
//
//	StepOverhead + PrefillTokenCost × prefill tokens + DecodeSeqCost × decoding sequences.
//
// KV memory is KVBlocks blocks of BlockSize tokens, reserved for a sequence's
// prompt and output when it is admitted; a request waits while they are not
// free. Full prompt blocks are cached by the hash of the prefix they end
// (prefix caching): a later prompt starting with the same blocks skips their
// prefill. Cached blocks no sequence uses are evicted least recently used.
type engine struct {
	cfg Config
	m   *metrics

	mu      sync.Mutex
	wake    chan struct{}
	waiting []*seq
	running []*seq
	rng     *rand.Rand
	free    []int             // never-cached free blocks
	cached  map[uint64]*block // prefix hash → block
	lru     *list.List        // cached blocks with no user, oldest first
	blocks  []block
	inUse   int
	stopped bool
}

type block struct {
	id   int
	hash uint64 // 0 when not a cached prompt block
	refs int
	elem *list.Element
}

// seq is one request inside the engine.
type seq struct {
	prompt    []uint64 // prefix hashes of the prompt's full blocks
	nPrompt   int
	maxOut    int
	finish    string // the finish_reason at maxOut: stop (its own end) or length (max_tokens)
	cached    int    // prompt tokens served by the prefix cache
	prefilled int
	generated int
	blocks    []int
	events    chan int // one value per generated token; closed at the end
	ctx       context.Context
	arrived   time.Time
	admitted  bool
}

func newEngine(cfg Config, m *metrics) *engine {
	e := &engine{cfg: cfg, m: m, wake: make(chan struct{}, 1), rng: rand.New(rand.NewPCG(cfg.Seed, 7)),
		cached: map[uint64]*block{}, lru: list.New(), blocks: make([]block, cfg.KVBlocks)}
	for i := range e.blocks {
		e.blocks[i].id = i
		e.free = append(e.free, i)
	}
	return e
}

// errTooLong is returned for a request that could never fit in KV memory.
var errTooLong = errors.New("prompt and output exceed the KV cache")

// errStopped is returned once the engine has stopped.
var errStopped = errors.New("engine stopped")

// submit queues a request with prompt token ids and returns a channel that
// yields once per output token and closes when the request ends.
func (e *engine) submit(ctx context.Context, tokens []uint32, maxOut, own int) (*seq, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.stopped {
		return nil, errStopped
	}
	// The answer's own length, where it would stop (a log-normal draw with
	// the configured median and spread), unless max_tokens cuts it first;
	// with IgnoreEOS, max_tokens is the length (as vLLM's ignore_eos).
	finish := "length"
	if maxOut <= 0 || !e.cfg.IgnoreEOS {
		natural := own
		if natural <= 0 {
			natural = max(1, int(math.Round(float64(e.cfg.OutputMedian)*math.Exp(e.cfg.OutputSigma*e.rng.NormFloat64()))))
			natural = min(natural, 8*e.cfg.OutputMedian)
		}
		if maxOut <= 0 || natural < maxOut {
			maxOut, finish = natural, "stop"
		}
	}
	if blocksFor(len(tokens)+maxOut, e.cfg.BlockSize) > e.cfg.KVBlocks {
		return nil, errTooLong
	}
	s := &seq{prompt: prefixHashes(tokens, e.cfg.BlockSize), nPrompt: len(tokens), maxOut: maxOut, finish: finish,
		events: make(chan int, maxOut+1), ctx: ctx, arrived: time.Now()}
	e.waiting = append(e.waiting, s)
	e.m.waiting.Set(float64(len(e.waiting)))
	select {
	case e.wake <- struct{}{}:
	default:
	}
	return s, nil
}

func blocksFor(tokens, size int) int { return (tokens + size - 1) / size }

// prefixHashes returns, for each full block of tokens, a hash of the whole
// prefix up to its end.
func prefixHashes(tokens []uint32, size int) []uint64 {
	var out []uint64
	h := fnv.New64a()
	var buf [4]byte
	for i, t := range tokens {
		buf[0], buf[1], buf[2], buf[3] = byte(t), byte(t>>8), byte(t>>16), byte(t>>24)
		h.Write(buf[:])
		if (i+1)%size == 0 {
			out = append(out, h.Sum64()|1) // never 0
		}
	}
	return out
}

// run is the engine loop; it returns when ctx is done.
func (e *engine) run(ctx context.Context) {
	for {
		e.mu.Lock()
		e.dropCancelled()
		e.admit()
		prefill, decoding := e.plan()
		e.mu.Unlock()
		if prefill == 0 && decoding == 0 {
			select {
			case <-ctx.Done():
				e.closeAll()
				return
			case <-e.wake:
			}
			continue
		}
		step := e.cfg.StepOverhead + time.Duration(prefill)*e.cfg.PrefillTokenCost + time.Duration(decoding)*e.cfg.DecodeSeqCost
		t := time.NewTimer(scale(step, e.cfg.TimeScale))
		select {
		case <-ctx.Done():
			t.Stop()
			e.closeAll()
			return
		case <-t.C:
		}
		e.mu.Lock()
		e.finishStep()
		e.mu.Unlock()
	}
}

// closeAll ends every request when the engine stops, so no handler waits
// forever.
func (e *engine) closeAll() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, s := range append(e.waiting, e.running...) {
		close(s.events)
	}
	e.waiting, e.running = nil, nil
	e.stopped = true
}

func scale(d time.Duration, f float64) time.Duration { return time.Duration(float64(d) * f) }

// dropCancelled frees sequences whose client went away.
func (e *engine) dropCancelled() {
	keep := e.waiting[:0]
	for _, s := range e.waiting {
		if s.ctx.Err() != nil {
			close(s.events)
			continue
		}
		keep = append(keep, s)
	}
	e.waiting = keep
	run := e.running[:0]
	for _, s := range e.running {
		if s.ctx.Err() != nil {
			e.release(s)
			close(s.events)
			continue
		}
		run = append(run, s)
	}
	e.running = run
	e.m.waiting.Set(float64(len(e.waiting)))
	e.m.running.Set(float64(len(e.running)))
}

// admit moves waiting sequences into the batch, in arrival order, while
// there is a slot and KV memory for them.
func (e *engine) admit() {
	for len(e.waiting) > 0 && len(e.running) < e.cfg.MaxNumSeqs {
		s := e.waiting[0]
		// Leading prompt blocks already cached.
		hits := 0
		for _, h := range s.prompt {
			if _, ok := e.cached[h]; !ok {
				break
			}
			hits++
		}
		// At least one prompt token is always computed, as in vLLM.
		if hits*e.cfg.BlockSize >= s.nPrompt {
			hits = (s.nPrompt - 1) / e.cfg.BlockSize
		}
		need := blocksFor(s.nPrompt+s.maxOut, e.cfg.BlockSize) - hits
		available := len(e.free) + e.lru.Len()
		for _, h := range s.prompt[:hits] {
			if e.cached[h].refs == 0 {
				available-- // reused, so not available for eviction
			}
		}
		if need > available {
			break // head-of-line: wait for memory
		}
		for _, h := range s.prompt[:hits] {
			s.blocks = append(s.blocks, e.ref(e.cached[h]))
		}
		for range need {
			s.blocks = append(s.blocks, e.alloc())
		}
		s.cached = hits * e.cfg.BlockSize
		s.prefilled = s.cached
		s.admitted = true
		e.m.prefixQueries.Add(float64(s.nPrompt))
		e.m.prefixHits.Add(float64(s.cached))
		e.waiting = e.waiting[1:]
		e.running = append(e.running, s)
	}
	e.m.waiting.Set(float64(len(e.waiting)))
	e.m.running.Set(float64(len(e.running)))
	e.m.kvUsage.Set(float64(e.inUse) / float64(len(e.blocks)))
}

func (e *engine) ref(b *block) int {
	if b.refs == 0 {
		e.lru.Remove(b.elem)
		b.elem = nil
		e.inUse++
	}
	b.refs++
	return b.id
}

func (e *engine) alloc() int {
	var id int
	if n := len(e.free); n > 0 {
		id, e.free = e.free[n-1], e.free[:n-1]
	} else {
		b := e.lru.Remove(e.lru.Front()).(*block)
		delete(e.cached, b.hash)
		b.hash, b.elem = 0, nil
		id = b.id
	}
	e.blocks[id].refs = 1
	e.inUse++
	return id
}

// plan decides this step's work: one token for every decoding sequence,
// then prefill chunks in arrival order, within the token budget.
func (e *engine) plan() (prefill, decoding int) {
	budget := e.cfg.MaxNumBatchedTokens
	for _, s := range e.running {
		if s.prefilled == s.nPrompt {
			decoding++
			budget--
		}
	}
	for _, s := range e.running {
		if rem := s.nPrompt - s.prefilled; rem > 0 && budget > 0 {
			prefill += min(rem, budget)
			budget -= min(rem, budget)
		}
	}
	return prefill, decoding
}

// finishStep applies the planned step: prefill progress, one new token per
// decoding sequence (the first token when a prefill completes), and frees the
// sequences that are done.
func (e *engine) finishStep() {
	budget := e.cfg.MaxNumBatchedTokens
	var emit []*seq
	for _, s := range e.running {
		if s.prefilled == s.nPrompt {
			budget--
			emit = append(emit, s)
		}
	}
	for _, s := range e.running {
		if rem := s.nPrompt - s.prefilled; rem > 0 && budget > 0 {
			n := min(rem, budget)
			s.prefilled += n
			budget -= n
			e.m.promptTokens.Add(float64(n))
			e.cacheComputed(s)
			if s.prefilled == s.nPrompt {
				emit = append(emit, s) // the first token comes with the last prefill chunk
				e.m.ttft.Observe(time.Since(s.arrived).Seconds())
			}
		}
	}
	for _, s := range emit {
		s.generated++
		e.m.generationTokens.Inc()
		if s.generated >= s.maxOut {
			// Observed before the last token is handed over, so a client that
			// has read the whole response also sees it counted.
			e.m.e2e.Observe(time.Since(s.arrived).Seconds())
		}
		s.events <- s.generated
	}
	keep := e.running[:0]
	for _, s := range e.running {
		if s.generated >= s.maxOut {
			e.release(s)
			close(s.events)
			continue
		}
		keep = append(keep, s)
	}
	e.running = keep
	e.m.running.Set(float64(len(e.running)))
	e.m.kvUsage.Set(float64(e.inUse) / float64(len(e.blocks)))
	e.admit()
}

// cacheComputed enters a sequence's fully computed prompt blocks into the
// prefix cache as soon as they exist, as vLLM does, so that requests running
// at the same time share them.
func (e *engine) cacheComputed(s *seq) {
	for i, id := range s.blocks {
		if i >= len(s.prompt) || s.prefilled < (i+1)*e.cfg.BlockSize {
			return
		}
		b := &e.blocks[id]
		if b.hash != 0 {
			continue
		}
		if _, dup := e.cached[s.prompt[i]]; !dup {
			b.hash = s.prompt[i]
			e.cached[b.hash] = b
		}
	}
}

// release returns a sequence's blocks: its cached prompt blocks stay cached
// (evictable once unused), the rest are freed.
func (e *engine) release(s *seq) {
	for _, id := range s.blocks {
		b := &e.blocks[id]
		b.refs--
		if b.refs > 0 {
			continue
		}
		e.inUse--
		if b.hash != 0 {
			b.elem = e.lru.PushBack(b)
		} else {
			e.free = append(e.free, id)
		}
	}
	s.blocks = nil
}
