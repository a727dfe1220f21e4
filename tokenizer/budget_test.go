package tokenizer

import (
	"encoding/json"
	"fmt"
	"math"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tokenlb/tokenlb/llmapi"
)

// chatBody returns a chat request whose user message is text.
func chatBody(t testing.TB, system, text string) []byte {
	t.Helper()
	b, err := json.Marshal(map[string]any{"model": "m", "messages": []map[string]string{
		{"role": "system", "content": system}, {"role": "user", "content": text}}})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// manyBody returns a chat request of n user messages, each text.
func manyBody(t testing.TB, n int, text string) []byte {
	t.Helper()
	msgs := make([]map[string]string, n)
	for i := range msgs {
		// Each message differs, so that the cache cannot help.
		msgs[i] = map[string]string{"role": "user", "content": fmt.Sprintf("%d %s", i, text)}
	}
	b, err := json.Marshal(map[string]any{"model": "m", "messages": msgs})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// counted is what counting a request body found.
type counted struct {
	llmapi.Prompt
	Estimated string
}

// countRequest counts a chat request body as tokenlb does: llmapi walks
// it, and a Budget counts its texts.
func countRequest(tk *Tokenizer, body []byte) (counted, error) {
	b := tk.Budget()
	p, err := llmapi.Parse("/v1/chat/completions", body, b)
	b.Done()
	return counted{p, b.Estimated()}, err
}

// meter is an engine that adds up the bytes it counts (not those it is
// given: under a deadline, it may stop short of them).
type meter struct {
	engine
	bytes int
}

func (m *meter) count(s string, deadline time.Time) (int, int) {
	n, covered := m.engine.count(s, deadline)
	m.bytes += covered
	return n, covered
}

func TestCacheCountsRepeatedTexts(t *testing.T) {
	tk, err := New(Options{CacheEntries: 1024, CacheMinBytes: 64})
	if err != nil {
		t.Fatal(err)
	}
	ref, err := New(Options{CacheEntries: -1})
	if err != nil {
		t.Fatal(err)
	}
	system := strings.Repeat("You are a careful assistant; answer briefly. ", 10)
	for i := range 5 {
		body := chatBody(t, system, fmt.Sprintf("Question %d: what is %d squared?", i, i))
		got, err := countRequest(tk, body)
		if err != nil {
			t.Fatal(err)
		}
		want, err := countRequest(ref, body)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("request %d with the cache = %+v, without = %+v", i, got, want)
		}
	}
	// The system prompt is long enough to cache, the questions are not:
	// one miss, then four hits.
	if s := tk.Stats(); s.CacheHits != 4 || s.CacheMisses != 1 || s.CacheEntries != 1 {
		t.Fatalf("stats = %+v, want 4 hits, 1 miss, 1 entry", s)
	}
	if s := ref.Stats(); s.CacheHits != 0 || s.CacheMisses != 0 {
		t.Fatalf("stats without a cache = %+v", s)
	}
}

// TestCacheIsBounded fills the cache with far more texts than it may hold.
func TestCacheIsBounded(t *testing.T) {
	const limit = 256
	tk, err := New(Options{CacheEntries: limit, CacheMinBytes: 1})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 100 * limit {
		tk.Count(fmt.Sprintf("text number %d", i))
	}
	if s := tk.Stats(); s.CacheEntries > limit || s.CacheEntries < limit/4 {
		t.Fatalf("%d entries after %d texts, want at most %d (and a useful share of it)", s.CacheEntries, 100*limit, limit)
	}
	// A text used all along stays while the others age out.
	hot := "the text every request repeats"
	want := tk.Count(hot)
	for i := range 100 * limit {
		tk.Count(fmt.Sprintf("other text %d", i))
		if i%(limit/8) == 0 {
			tk.Count(hot)
		}
	}
	before := tk.Stats().CacheHits
	if got := tk.Count(hot); got != want || tk.Stats().CacheHits != before+1 {
		t.Fatalf("hot text: count %d (want %d), hits %d → %d: it was evicted", got, want, before, tk.Stats().CacheHits)
	}
}

func TestCacheConcurrent(t *testing.T) {
	tk, err := New(Options{CacheEntries: 64, CacheMinBytes: 1})
	if err != nil {
		t.Fatal(err)
	}
	texts := []string{"alpha beta gamma", "日本語のテキスト", "x = f(y) + 1", "🚀 launch"}
	want := make([]int, len(texts))
	for i, s := range texts {
		want[i], _ = tk.engine.(fastEngine).Count(s, time.Time{})
	}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 500 {
				k := (g + i) % len(texts)
				if got := tk.Count(texts[k]); got != want[k] {
					t.Errorf("Count(%q) = %d, want %d", texts[k], got, want[k])
					return
				}
				tk.Count(fmt.Sprintf("filler %d %d", g, i)) // forces generations to turn over
			}
		})
	}
	wg.Wait()
}

// TestBudget: a request past ExactBytes or TimeLimit is counted in part and
// estimated for the rest, close to the exact count, and says so.
func TestBudget(t *testing.T) {
	big := strings.Repeat(corpus(t)["prose"], 8) // about 240 KB
	system := "You are a helpful assistant."
	body := chatBody(t, system, big)
	exact, err := New(Options{CacheEntries: -1, ExactBytes: 64 << 20, TimeLimit: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	want, err := countRequest(exact, body)
	if err != nil || want.Estimated != "" {
		t.Fatalf("exact count: %+v, %v", want, err)
	}
	if ref := exact.Count(big); ref < 40000 {
		t.Fatalf("the big text counts only %d tokens", ref)
	}
	cases := []struct {
		name string
		opts Options
		why  string
	}{
		// The time limit is generous where time is not what is tested, so
		// that a busy machine does not turn the case into an estimate.
		{"under both", Options{TimeLimit: time.Hour}, ""},
		{"over size", Options{ExactBytes: 16 << 10, TimeLimit: time.Hour}, EstimatedSize},
		{"over time", Options{TimeLimit: time.Nanosecond}, EstimatedTime},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			c.opts.CacheEntries = -1
			tk, err := New(c.opts)
			if err != nil {
				t.Fatal(err)
			}
			got, err := countRequest(tk, body)
			if err != nil {
				t.Fatal(err)
			}
			if got.Estimated != c.why {
				t.Fatalf("Estimated = %q, want %q", got.Estimated, c.why)
			}
			s := tk.Stats()
			if c.why == "" {
				if !reflect.DeepEqual(got, want) || s.EstimatedSize+s.EstimatedTime != 0 {
					t.Fatalf("count %+v (stats %+v), want exactly %+v", got, s, want)
				}
				return
			}
			if e := math.Abs(float64(got.Tokens-want.Tokens)) / float64(want.Tokens); e > 0.05 {
				t.Fatalf("estimate %d is %.1f%% off the exact %d", got.Tokens, 100*e, want.Tokens)
			}
			if n := map[string]uint64{EstimatedSize: s.EstimatedSize, EstimatedTime: s.EstimatedTime}[c.why]; n != 1 ||
				s.EstimatedSize+s.EstimatedTime != 1 {
				t.Fatalf("stats %+v, want one request estimated for %s", s, c.why)
			}
			// The estimated text must not be cached as if exact.
			if s.CacheEntries != 0 {
				t.Fatalf("estimated count cached: %+v", s)
			}
		})
	}
}

// TestBudgetBoundsTime: with the time limit, counting texts that would take
// far longer stops early, on both counting engines: inside one long text
// (at the engine's first look at the clock), between many short texts (at
// the Budget's), and at a pre-tokenizer piece too long to merge under a
// deadline (refused before any look). The limit is a microsecond, so that
// it has passed at the first look however fast the machine, and the texts
// go to the Budget directly, so that its clock starts with the first of
// them. What is counted is then about ratioBytes (what an estimate rests
// on) and a look's stretch of 16 KiB. The bound on the duration is
// generous: this checks that counting stops, not how fast the machine is.
func TestBudgetBoundsTime(t *testing.T) {
	corpus := corpus(t)
	var many []string // each too short for a look at the clock inside it
	for i := range 300 {
		many = append(many, fmt.Sprintf("%d %s", i, corpus["cjk"])) // 1.1 MB in all
	}
	cases := map[string][]string{
		"code":        {strings.Repeat(corpus["code"], 60)}, // 2 MB: seconds with tiktoken-go
		"one piece":   {strings.Repeat("[", 4<<20)},         // one 4 MB piece
		"four pieces": {strings.Repeat(strings.Repeat(" ", 1<<20)+"x", 4)},
		"many texts":  many,
	}
	for _, engine := range []string{"fast", "tiktoken"} {
		for name, texts := range cases {
			if engine == "tiktoken" && name != "code" {
				continue // tiktoken-go cannot be interrupted inside a chunk
			}
			t.Run(engine+"/"+name, func(t *testing.T) {
				tk, err := New(Options{Engine: engine, CacheEntries: -1, ExactBytes: 64 << 20, TimeLimit: time.Microsecond})
				if err != nil {
					t.Fatal(err)
				}
				m := &meter{engine: tk.engine}
				tk.engine = m
				start := time.Now()
				b := tk.Budget()
				tokens, size := 0, 0
				for _, s := range texts {
					tokens, size = tokens+b.Count(s), size+len(s)
				}
				if d := time.Since(start); b.Estimated() != EstimatedTime || m.bytes > 4*ratioBytes || d > 10*time.Second || tokens <= 0 {
					t.Fatalf("counted %d tokens in %s from %d bytes of %d, Estimated %q; want an estimate cut at the time limit",
						tokens, d, m.bytes, size, b.Estimated())
				}
			})
		}
	}
}

// TestBudgetBoundsBytes: past ExactBytes, a request of many small texts is
// not counted in full text by text: at most ExactBytes and SampleBytes of it
// (and a text) are counted, and the estimate stays close.
func TestBudgetBoundsBytes(t *testing.T) {
	body := manyBody(t, 2000, corpus(t)["prose"][:2<<10]) // 4 MB in 2 KiB texts
	exact, err := New(Options{CacheEntries: -1, ExactBytes: 64 << 20, TimeLimit: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	want, err := countRequest(exact, body)
	if err != nil {
		t.Fatal(err)
	}
	opts := Options{CacheEntries: -1, ExactBytes: 16 << 10, SampleBytes: 32 << 10, TimeLimit: time.Hour}
	tk, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	m := &meter{engine: tk.engine}
	tk.engine = m
	got, err := countRequest(tk, body)
	if err != nil {
		t.Fatal(err)
	}
	if limit := opts.ExactBytes + opts.SampleBytes + 4<<10; m.bytes > limit {
		t.Errorf("counted %d bytes of a %d-byte request; want at most %d", m.bytes, len(body), limit)
	}
	if got.Estimated != EstimatedSize || tk.Stats().EstimatedSize != 1 {
		t.Errorf("Estimated %q, stats %+v; want one request estimated for size", got.Estimated, tk.Stats())
	}
	if e := math.Abs(float64(got.Tokens-want.Tokens)) / float64(want.Tokens); e > 0.05 {
		t.Errorf("estimate %d is %.1f%% off the exact %d", got.Tokens, 100*e, want.Tokens)
	}
}

func TestAlignRune(t *testing.T) {
	for _, c := range []struct {
		s       string
		i, want int
	}{
		{"abc", 1, 1},
		{"a世b", 2, 1},                      // inside 世 (bytes 1-3): back to its start
		{"a世b", 4, 4},                      // at b
		{"a世b", 9, 5},                      // past the end
		{"\x80\x80\x80\x80\x80\x80", 5, 2}, // no rune start: at most 3 bytes back
		{"", 0, 0},
	} {
		if got := alignRune(c.s, c.i); got != c.want {
			t.Errorf("alignRune(%q, %d) = %d, want %d", c.s, c.i, got, c.want)
		}
	}
}

// TestBudgetClockStartsAtCounting: the time limit counts from the first
// text counted, not from when the budget was made: the time a request's
// JSON takes to decode is not taken from counting it.
func TestBudgetClockStartsAtCounting(t *testing.T) {
	tk, err := New(Options{CacheEntries: -1, TimeLimit: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	b := tk.Budget()
	time.Sleep(100 * time.Millisecond) // decoding a large body, say: not an event to wait for
	if n := b.Count("Hello, world!"); n != 4 || b.Estimated() != "" {
		t.Fatalf("counted %d (estimated %q) after a pause longer than the time limit, want 4 exactly", n, b.Estimated())
	}
}

// TestEstimateRestsOnText: past the time limit, a request's estimate rests
// on at least 16 KiB of its own text (stretches of it are counted whatever
// the clock), and on not much more.
func TestEstimateRestsOnText(t *testing.T) {
	tk, err := New(Options{CacheEntries: -1, TimeLimit: time.Nanosecond})
	if err != nil {
		t.Fatal(err)
	}
	m := &meter{engine: tk.engine}
	tk.engine = m
	big := strings.Repeat(corpus(t)["prose"], 8)
	p, err := countRequest(tk, chatBody(t, "You are a helpful assistant.", big))
	if err != nil {
		t.Fatal(err)
	}
	if p.Estimated != EstimatedTime || m.bytes < ratioBytes-512 || m.bytes > ratioBytes+1024 {
		t.Fatalf("counted %d bytes of text (estimated %q), want about %d", m.bytes, p.Estimated, ratioBytes)
	}
}
