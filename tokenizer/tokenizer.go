// Package tokenizer turns text into a token count: exactly, with a tiktoken
// encoding (cl100k_base or o200k_base) whose BPE ranks are compiled into the
// binary, so that nothing is downloaded at run time. Which texts a request
// holds is package llmapi's business; a Budget counts one request's texts
// within a size and a time limit.
//
// Two engines count: "fast" (the default), a count-only pre-tokenizer and
// byte-pair merger written for these two encodings, and "tiktoken",
// github.com/pkoukk/tiktoken-go, which the fast engine is tested against and
// returns the same counts as. Repeated texts (system prompts, tool
// definitions, earlier turns) are counted once and then found in a bounded
// cache; a request too large or too slow to count exactly within its Budget
// is counted exactly in part and the rest estimated (see Options).
package tokenizer

import (
	"fmt"
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

// Engines lists the counting engines New accepts: fast and tiktoken count
// exactly; bytes estimates a token per 4 bytes, as routers that do not
// tokenize do (to measure what exact counting is worth).
var Engines = []string{"fast", "tiktoken", "bytes"}

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
	// the rest of the request is estimated (Budget.Estimated says why).
	// Texts past ExactBytes are estimated from SampleBytes of them (in all,
	// per request) counted exactly; after TimeLimit, from the ratio of
	// tokens to bytes in what the request had counted so far.
	ExactBytes  int
	TimeLimit   time.Duration
	SampleBytes int
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
	return o
}

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
}

// fastEngine is the fast engine: a fast.Encoding, built once per process
// for each encoding and shared by every Tokenizer.
type fastEngine struct{ *fast.Encoding }

func (e fastEngine) count(s string, deadline time.Time) (tokens, covered int) {
	return e.Count(s, deadline)
}

// bytesEngine counts a token per 4 bytes, rounded up.
type bytesEngine struct{}

func (bytesEngine) count(s string, _ time.Time) (tokens, covered int) {
	return (len(s) + 3) / 4, len(s)
}

// New returns a Tokenizer. The BPE ranks come from the files embedded by
// tiktoken-go-loader, so New never touches the network.
func New(opts Options) (*Tokenizer, error) {
	opts = opts.withDefaults()
	if !slices.Contains(Encodings, opts.Encoding) {
		return nil, fmt.Errorf("tokenizer: unknown encoding %q (want one of %v)", opts.Encoding, Encodings)
	}
	t := &Tokenizer{opts: opts}
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
	case "bytes":
		t.engine = bytesEngine{}
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
// chunkBytes. A chunk ends where a letter, a space and a letter meet: both
// encodings always start a new piece at that space, so the count stays
// exact. Only a stretch of maxChunk bytes with no such place is split
// elsewhere (on a rune boundary), which can change the count by a token or
// so at each such split. The fast engine needs no chunks.
func (e *tiktokenEncoding) count(s string, deadline time.Time) (int, int) {
	n, covered := 0, 0
	for covered < len(s) {
		if !deadline.IsZero() && covered > 0 && time.Now().After(deadline) {
			break
		}
		rest := s[covered:]
		chunk := rest[:chunkLen(rest)]
		n += len(e.enc.EncodeOrdinary(chunk))
		covered += len(chunk)
	}
	return n, covered
}

const (
	chunkBytes = 4 << 10  // preferred chunk size
	maxChunk   = 16 << 10 // largest chunk searched for an exact end
	roughChunk = 512      // size of a chunk where no exact end exists
)

// chunkLen returns the length of the next chunk of s to encode.
func chunkLen(s string) int {
	if len(s) <= chunkBytes {
		return len(s)
	}
	end := min(len(s), maxChunk)
	// The last exact end below chunkBytes, else the first one above it.
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
	// No exact end: take roughChunk bytes, backed up to a rune start.
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
