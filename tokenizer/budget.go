package tokenizer

import (
	"time"
	"unicode/utf8"
)

// Why a request's count was partly estimated.
const (
	EstimatedSize = "size" // more text than Options.ExactBytes
	EstimatedTime = "time" // counting took longer than Options.TimeLimit
)

// Budget counts the texts of one request within Options.ExactBytes and
// Options.TimeLimit. Past ExactBytes, texts are estimated: from SampleBytes
// of them counted exactly (for the whole request, not per text), then from
// the ratio of tokens to bytes counted so far. Past TimeLimit, from that
// ratio alone. The time counts from the first text counted, so that what
// comes before (decoding the request's JSON) is not taken from counting.
// The clock is read before each text that is not cached and,
// inside a long text, as the engine goes (the fast engine every 16 KiB, and
// within the merge of a piece too long to merge at once; tiktoken-go between
// chunks), so a request overruns its time by at most one such stretch.
type Budget struct {
	t          *Tokenizer
	deadline   time.Time // zero until the first text is counted
	exactLeft  int       // bytes still counted exactly
	sampleLeft int       // bytes still counted exactly to estimate the rest
	// tokens and bytes counted exactly so far, for the ratio.
	tokens, bytes int
	estimated     string // "", EstimatedSize or EstimatedTime
	// sampledPastTime is how much text was counted past the time limit,
	// for pastTime's ratio.
	sampledPastTime int
}

// Budget returns a budget for one request's texts. It is for one
// goroutine; call Done once the request is counted.
func (t *Tokenizer) Budget() *Budget {
	return &Budget{t: t, exactLeft: t.opts.ExactBytes, sampleLeft: t.opts.SampleBytes}
}

// Count returns the tokens of s, exactly while the budget lasts.
func (b *Budget) Count(s string) int {
	if s == "" {
		return 0
	}
	k, n, ok := b.t.cached(s)
	if ok {
		b.tokens, b.bytes = b.tokens+n, b.bytes+len(s)
		return n
	}
	now := time.Now()
	if b.deadline.IsZero() {
		b.deadline = now.Add(b.t.opts.TimeLimit)
	}
	if b.estimated != EstimatedTime && now.After(b.deadline) {
		b.estimated = EstimatedTime
	}
	if b.estimated == EstimatedTime {
		return b.pastTime(s)
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
// (exactLeft or sampleLeft); whole is false when the deadline stopped it early
// and the rest of s was estimated by the ratio.
func (b *Budget) exact(s string, left *int) (n int, whole bool) {
	n, covered := b.t.engine.count(s, b.deadline)
	*left -= covered
	b.tokens, b.bytes = b.tokens+n, b.bytes+covered
	if covered == len(s) {
		return n, true
	}
	b.estimated = EstimatedTime
	return n + b.pastTime(s[covered:]), false
}

// Estimated returns "" when every text so far was counted exactly, else
// why part of them was estimated: EstimatedSize or EstimatedTime.
func (b *Budget) Estimated() string { return b.estimated }

// Done records in the Tokenizer's Stats why the request was estimated, if
// it was.
func (b *Budget) Done() {
	switch b.estimated {
	case EstimatedSize:
		b.t.estimatedSize.Add(1)
	case EstimatedTime:
		b.t.estimatedTime.Add(1)
	}
}

// pastTime estimates the tokens of s, a text met past the time limit, from
// the ratio counted so far. While that ratio rests on less than ratioBytes
// of text, it first counts a little of s itself (stretches spread over it,
// at most ratioBytes in all per request, whatever the clock), so that an
// estimate never rests on a word or two.
func (b *Budget) pastTime(s string) int {
	need := min(ratioBytes-b.bytes, ratioBytes-b.sampledPastTime)
	if need <= 0 {
		return b.byRatio(len(s))
	}
	if len(s) <= need {
		n, covered := b.t.engine.count(s, time.Time{})
		b.sampledPastTime += covered
		b.tokens, b.bytes = b.tokens+n, b.bytes+covered
		return n
	}
	const windows = 8
	w, step := need/windows, len(s)/windows
	for k := range windows {
		// Each stretch somewhere in its eighth of s, not at its start: a
		// text that repeats itself every eighth would show the same bytes.
		at := k*step + int(uint64(k+1)*0x9e3779b97f4a7c15>>40)%max(1, step-w)
		lo, hi := alignRune(s, at), alignRune(s, at+w)
		if hi <= lo {
			continue
		}
		n, covered := b.t.engine.count(s[lo:hi], time.Time{})
		b.sampledPastTime += covered
		b.tokens, b.bytes = b.tokens+n, b.bytes+covered
	}
	return b.byRatio(len(s))
}

// ratioBytes is how much text a ratio estimate must rest on.
const ratioBytes = 16 << 10

// byRatio estimates the tokens of n bytes from the ratio counted so far in
// this request, or 1 token per 4 bytes before anything was counted.
func (b *Budget) byRatio(n int) int {
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
func (b *Budget) sample(s string) int {
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
	if b.estimated == EstimatedTime {
		// The clock stopped the sample: the ratio must still rest on
		// enough of the text.
		return b.pastTime(s)
	}
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
