// Package tokenizer turns an LLM API request body into a prompt token count.
//
// It knows the request shapes of the OpenAI chat completions, completions,
// embeddings and responses APIs and of the Anthropic messages API, and counts
// everything else by its string values. Counting uses a tiktoken encoding
// (cl100k_base or o200k_base) whose BPE ranks are compiled into the binary:
// nothing is downloaded at run time.
//
// Two engines count: "fast" (the default), a count-only pre-tokenizer and
// byte-pair merger written for these two encodings, and "tiktoken",
// github.com/pkoukk/tiktoken-go, which the fast engine is tested against and
// returns the same counts as. Repeated texts (system prompts, tool
// definitions, earlier turns) are counted once and then found in a bounded
// cache; a request too large or too slow to count exactly within its budget
// is counted exactly in part and the rest estimated (see Options).
package tokenizer

import (
	"fmt"
	"hash/maphash"
	"slices"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"

	tiktoken "github.com/pkoukk/tiktoken-go"
	tiktokenloader "github.com/pkoukk/tiktoken-go-loader"

	"github.com/tokenlb/tokenlb/tokenizer/internal/fast"
)

// Encodings lists the encoding names New accepts.
var Encodings = []string{"cl100k_base", "o200k_base"}

// Engines lists the counting engines New accepts.
var Engines = []string{"fast", "tiktoken"}

// Defaults for Options left zero.
const (
	DefaultEncoding      = "cl100k_base"
	DefaultEngine        = "fast"
	DefaultCacheEntries  = 1 << 16
	DefaultCacheMinBytes = 256
	DefaultExactBytes    = 1 << 20
	DefaultTimeLimit     = 20 * time.Millisecond
	// DefaultSampleBytes is how much of the text past a request's budget
	// is counted exactly to estimate the rest.
	DefaultSampleBytes = 64 << 10
)

// Options configure a Tokenizer. The zero Options is cl100k_base on the fast
// engine with every default.
type Options struct {
	Encoding string // cl100k_base or o200k_base
	Engine   string // fast or tiktoken
	// CacheEntries bounds the count cache (about 100 bytes an entry); < 0
	// turns it off. Texts shorter than CacheMinBytes are counted each time:
	// counting them costs about what a lookup does.
	CacheEntries  int
	CacheMinBytes int
	// ExactBytes and TimeLimit bound the exact counting of one request:
	// past ExactBytes of text, or once counting it has taken TimeLimit,
	// the rest of the request is estimated (Prompt.Estimated says why).
	// Texts past ExactBytes are estimated from SampleBytes of them (in all,
	// per request) counted exactly; after TimeLimit, from the ratio of
	// tokens to bytes in what the request had counted so far.
	ExactBytes  int
	TimeLimit   time.Duration
	SampleBytes int
	// PrefixBlocks, when positive, makes CountRequest hash the prompt's
	// first PrefixBlocks blocks of PrefixBlockBytes (Prompt.Prefix), for
	// prefix affinity. 0 leaves it out.
	PrefixBlocks     int
	PrefixBlockBytes int
}

func (o Options) withDefaults() Options {
	if o.Encoding == "" {
		o.Encoding = DefaultEncoding
	}
	if o.Engine == "" {
		o.Engine = DefaultEngine
	}
	if o.CacheEntries == 0 {
		o.CacheEntries = DefaultCacheEntries
	}
	if o.CacheMinBytes <= 0 {
		o.CacheMinBytes = DefaultCacheMinBytes
	}
	if o.ExactBytes <= 0 {
		o.ExactBytes = DefaultExactBytes
	}
	if o.TimeLimit <= 0 {
		o.TimeLimit = DefaultTimeLimit
	}
	if o.SampleBytes <= 0 {
		o.SampleBytes = DefaultSampleBytes
	}
	if o.PrefixBlockBytes <= 0 {
		o.PrefixBlockBytes = DefaultPrefixBlockBytes
	}
	return o
}

// DefaultPrefixBlockBytes is the prefix hash's block: about 128 tokens,
// a few of a backend's cache blocks.
const DefaultPrefixBlockBytes = 512

// engine counts the tokens of a text.
type engine interface {
	// count counts s from its start and stops early, at a piece boundary,
	// once the deadline (when not zero) has passed. It returns the tokens
	// counted and the bytes of s they cover.
	count(s string, deadline time.Time) (tokens, covered int)
}

// Tokenizer counts tokens with one encoding. It is safe for concurrent use.
type Tokenizer struct {
	opts   Options
	engine engine
	cache  *cache // nil when off
	// estimated counts requests whose count was partly estimated.
	estimatedSize, estimatedTime atomic.Uint64
	seed                         maphash.Seed // of prefix hashes
}

// fastEngine is the fast engine: a fast.Encoding, built once per process
// for each encoding and shared by every Tokenizer.
type fastEngine struct{ *fast.Encoding }

func (e fastEngine) count(s string, deadline time.Time) (tokens, covered int) {
	return e.Count(s, deadline)
}

// New returns a Tokenizer. The BPE ranks come from the files embedded by
// tiktoken-go-loader, so New never touches the network.
func New(opts Options) (*Tokenizer, error) {
	opts = opts.withDefaults()
	if !slices.Contains(Encodings, opts.Encoding) {
		return nil, fmt.Errorf("tokenizer: unknown encoding %q (want one of %v)", opts.Encoding, Encodings)
	}
	t := &Tokenizer{opts: opts, seed: maphash.MakeSeed()}
	switch opts.Engine {
	case "fast":
		e, err := fast.Load(opts.Encoding)
		if err != nil {
			return nil, fmt.Errorf("tokenizer: %w", err)
		}
		t.engine = fastEngine{e}
	case "tiktoken":
		e, err := newTiktoken(opts.Encoding)
		if err != nil {
			return nil, fmt.Errorf("tokenizer: %w", err)
		}
		t.engine = e
	default:
		return nil, fmt.Errorf("tokenizer: unknown engine %q (want one of %v)", opts.Engine, Engines)
	}
	if opts.CacheEntries > 0 {
		t.cache = newCache(opts.CacheEntries)
	}
	return t, nil
}

// Encoding returns the encoding's name.
func (t *Tokenizer) Encoding() string { return t.opts.Encoding }

// Engine returns the counting engine's name.
func (t *Tokenizer) Engine() string { return t.opts.Engine }

// Count returns the number of tokens in s. Special-token text such as
// "<|endoftext|>" is counted as ordinary text, as a model's chat template
// treats user content. Count uses the cache but no budget: it is always
// exact (with the tiktoken engine, see tiktokenEncoding for its one
// exception).
func (t *Tokenizer) Count(s string) int {
	k, n, ok := t.cached(s)
	if ok {
		return n
	}
	n, _ = t.engine.count(s, time.Time{})
	t.remember(k, n)
	return n
}

// cached looks s up in the cache. The key it returns is for remember, so
// that a text missed and then counted is hashed once; it is the zero key
// when s is not cached (no cache, or s too short), which remember skips.
func (t *Tokenizer) cached(s string) (k cacheKey, n int, ok bool) {
	if t.cache == nil || len(s) < t.opts.CacheMinBytes {
		return cacheKey{}, 0, false
	}
	k = t.cache.key(s)
	n, ok = t.cache.get(k)
	return k, n, ok
}

// remember keeps n as the count of the text cached returned k for.
func (t *Tokenizer) remember(k cacheKey, n int) {
	if k != (cacheKey{}) {
		t.cache.put(k, n)
	}
}

// Stats are a Tokenizer's counters since New.
type Stats struct {
	CacheHits, CacheMisses uint64
	CacheEntries           int
	// EstimatedSize and EstimatedTime count requests partly estimated
	// because they were over ExactBytes or over TimeLimit.
	EstimatedSize, EstimatedTime uint64
}

// Stats returns the Tokenizer's counters.
func (t *Tokenizer) Stats() Stats {
	s := Stats{EstimatedSize: t.estimatedSize.Load(), EstimatedTime: t.estimatedTime.Load()}
	if t.cache != nil {
		s.CacheHits, s.CacheMisses, s.CacheEntries = t.cache.stats()
	}
	return s
}

// Why a request's count was partly estimated.
const (
	EstimatedSize = "size" // more text than Options.ExactBytes
	EstimatedTime = "time" // counting took longer than Options.TimeLimit
)

// budget counts the texts of one request within Options.ExactBytes and
// Options.TimeLimit. Past ExactBytes, texts are estimated: from SampleBytes
// of them counted exactly (for the whole request, not per text), then from
// the ratio of tokens to bytes counted so far. Past TimeLimit, from that
// ratio alone. The clock is read before each text that is not cached and,
// inside a long text, every deadlineEvery bytes, so a request overruns its
// time by at most one such stretch (or one long piece's merge, bounded by
// maxBudgetPiece).
type budget struct {
	t          *Tokenizer
	deadline   time.Time
	exactLeft  int // bytes still counted exactly
	sampleLeft int // bytes still counted exactly to estimate the rest
	// tokens and bytes counted exactly so far, for the ratio.
	tokens, bytes int
	estimated     string // "", EstimatedSize or EstimatedTime
	prefix        prefixHasher
	textBytes     int // of every text, counted or not
}

func (t *Tokenizer) newBudget() *budget {
	return &budget{t: t, deadline: time.Now().Add(t.opts.TimeLimit),
		exactLeft: t.opts.ExactBytes, sampleLeft: t.opts.SampleBytes}
}

// prefixHasher hashes the leading blocks of a request's texts, in the order
// the request lists them (for chat: each message's role and content in turn,
// then tool definitions), each text followed by a separator byte. One hash
// runs over all of them and is read at the end of each block, so each
// block's hash covers every block before it: two prompts share a block's
// hash exactly when they start with the same texts up to its end. A last
// block that is not full is left out, as a backend's prefix cache leaves out
// its last partial block. Prompts given as token ids are not hashed.
type prefixHasher struct {
	h      maphash.Hash
	n      int // bytes in the current block
	hashes []uint64
}

func (b *budget) hashPrefix(s string) {
	t, ph := b.t, &b.prefix
	if ph.n == 0 && ph.hashes == nil { // nothing written yet
		ph.h.SetSeed(t.seed)
	}
	for len(s) > 0 && len(ph.hashes) < t.opts.PrefixBlocks {
		k := min(len(s), t.opts.PrefixBlockBytes-ph.n)
		ph.h.WriteString(s[:k])
		s, ph.n = s[k:], ph.n+k
		if ph.n == t.opts.PrefixBlockBytes {
			ph.hashes = append(ph.hashes, ph.h.Sum64())
			ph.n = 0
		}
	}
}

// text returns the tokens of s, exactly while the budget lasts.
func (b *budget) text(s string) int {
	if s == "" {
		return 0
	}
	b.textBytes += len(s)
	if len(b.prefix.hashes) < b.t.opts.PrefixBlocks {
		b.hashPrefix(s)
		b.hashPrefix("\x1e") // so that "ab" then "c" is not "a" then "bc"
	}
	k, n, ok := b.t.cached(s)
	if ok {
		b.tokens, b.bytes = b.tokens+n, b.bytes+len(s)
		return n
	}
	if b.estimated != EstimatedTime && time.Now().After(b.deadline) {
		b.estimated = EstimatedTime
	}
	if b.estimated == EstimatedTime {
		return b.byRatio(len(s))
	}
	if len(s) > b.exactLeft {
		return b.sample(s)
	}
	n, whole := b.exact(s, &b.exactLeft)
	if whole {
		b.t.remember(k, n)
	}
	return n
}

// exact counts s until the deadline, taking the bytes counted from *left
// (exactLeft or sampleLeft); whole is false when the deadline cut it short
// and the rest of s was estimated by the ratio.
func (b *budget) exact(s string, left *int) (n int, whole bool) {
	n, covered := b.t.engine.count(s, b.deadline)
	*left -= covered
	b.tokens, b.bytes = b.tokens+n, b.bytes+covered
	if covered == len(s) {
		return n, true
	}
	b.estimated = EstimatedTime
	return n + b.byRatio(len(s)-covered), false
}

// done records why the request was estimated, if it was.
func (b *budget) done() {
	switch b.estimated {
	case EstimatedSize:
		b.t.estimatedSize.Add(1)
	case EstimatedTime:
		b.t.estimatedTime.Add(1)
	}
}

// byRatio estimates the tokens of n bytes from the ratio counted so far in
// this request, or 1 token per 4 bytes before anything was counted.
func (b *budget) byRatio(n int) int {
	if b.bytes == 0 {
		return (n + 3) / 4
	}
	return int(float64(n)*float64(b.tokens)/float64(b.bytes) + 0.5)
}

// sampleWindows is how many stretches of a text sample takes.
const sampleWindows = 16

// sample returns the tokens of s, a text past the size budget, counted
// with what is left of the request's SampleBytes: exactly when s fits in it,
// else estimated from sampleWindows stretches spread evenly over s, counted
// exactly (tokens per byte there and in the request so far, times the
// length of s). With the sample spent, it is the ratio alone.
func (b *budget) sample(s string) int {
	if len(s) <= b.sampleLeft {
		n, _ := b.exact(s, &b.sampleLeft)
		return n
	}
	if b.estimated == "" {
		b.estimated = EstimatedSize
	}
	w := b.sampleLeft / sampleWindows
	if w < 64 {
		return b.byRatio(len(s))
	}
	step := len(s) / sampleWindows
	tokens, bytes := 0, 0
	for k := range sampleWindows {
		lo := alignRune(s, k*step)
		hi := alignRune(s, k*step+w)
		if hi <= lo {
			continue
		}
		n, covered := b.t.engine.count(s[lo:hi], b.deadline)
		tokens, bytes = tokens+n, bytes+covered
		b.sampleLeft -= covered
		if covered < hi-lo {
			b.estimated = EstimatedTime
			break
		}
	}
	b.tokens, b.bytes = b.tokens+tokens, b.bytes+bytes
	return b.byRatio(len(s))
}

// alignRune moves i back to the start of the rune it falls in (at most
// utf8.UTFMax-1 bytes: in invalid UTF-8 there may be none).
func alignRune(s string, i int) int {
	i = min(i, len(s))
	for k := 0; k < utf8.UTFMax-1 && i > 0 && i < len(s) && !utf8.RuneStart(s[i]); k++ {
		i--
	}
	return i
}

// tiktokenEncoding counts with tiktoken-go.
type tiktokenEncoding struct{ enc *tiktoken.Tiktoken }

func newTiktoken(encoding string) (*tiktokenEncoding, error) {
	// tiktoken-go keeps its loader in a package variable; the offline loader
	// is the only one tokenlb ever installs, so setting it on every call is
	// idempotent and safe.
	tiktoken.SetBpeLoader(tiktokenloader.NewOfflineLoader())
	enc, err := tiktoken.GetEncoding(encoding)
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", encoding, err)
	}
	return &tiktokenEncoding{enc: enc}, nil
}

// count encodes s with tiktoken-go. Its byte-pair merging is quadratic in
// the length of one pre-tokenizer piece, so a long run without word breaks
// (a wall of punctuation, a paragraph of CJK) could stall a core for
// minutes; count therefore encodes long texts in chunks of at most
// chunkBytes. It cuts where a letter, a space and a letter meet: both
// encodings always start a new piece at that space, so the count stays
// exact. Only a stretch of maxChunk bytes with no such place is cut
// elsewhere (on a rune boundary), which can change the count by a token or
// so at each such cut. The fast engine needs no chunks.
func (e *tiktokenEncoding) count(s string, deadline time.Time) (int, int) {
	n, covered := 0, 0
	for covered < len(s) {
		if !deadline.IsZero() && covered > 0 && time.Now().After(deadline) {
			break
		}
		rest := s[covered:]
		chunk := rest[:cut(rest)]
		n += len(e.enc.EncodeOrdinary(chunk))
		covered += len(chunk)
	}
	return n, covered
}

const (
	chunkBytes = 4 << 10  // preferred chunk size
	maxChunk   = 16 << 10 // largest chunk searched for an exact cut
	roughChunk = 512      // size of a chunk cut where no exact cut exists
)

// cut returns the length of the next chunk of s to encode.
func cut(s string) int {
	if len(s) <= chunkBytes {
		return len(s)
	}
	end := min(len(s), maxChunk)
	// The last exact cut below chunkBytes, else the first one above it.
	best := -1
	for i := 1; i+1 < end; i++ {
		if s[i] != ' ' || !isLetterAt(s, i+1) || !isLetterBefore(s, i) {
			continue
		}
		if i >= chunkBytes {
			if best < 0 {
				best = i
			}
			break
		}
		best = i
	}
	if best > 0 {
		return best
	}
	// No exact cut: take roughChunk bytes, backed up to a rune start.
	i := roughChunk
	for i > 0 && !utf8.RuneStart(s[i]) {
		i--
	}
	return i
}

func isLetterAt(s string, i int) bool {
	r, _ := utf8.DecodeRuneInString(s[i:])
	return unicode.IsLetter(r)
}

func isLetterBefore(s string, i int) bool {
	r, _ := utf8.DecodeLastRuneInString(s[:i])
	return unicode.IsLetter(r)
}
