package fast

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/dlclark/regexp2"
	tiktoken "github.com/pkoukk/tiktoken-go"
	tiktokenloader "github.com/pkoukk/tiktoken-go-loader"
)

// The fast engine is checked against tiktoken-go itself, encoding whole
// texts (no chunks), so these tests do not trust any count of their own.

// encodings are the encodings Load builds, in the order the tests check
// them.
var encodings = []string{"cl100k_base", "o200k_base"}

var (
	refOnce sync.Once
	refs    map[string]*tiktoken.Tiktoken
	fasts   map[string]*Encoding
	refErr  error
)

// engines returns tiktoken-go and the fast engine for each encoding, loaded
// once for the package's tests.
func engines(t testing.TB) (map[string]*tiktoken.Tiktoken, map[string]*Encoding) {
	t.Helper()
	refOnce.Do(func() {
		tiktoken.SetBpeLoader(tiktokenloader.NewOfflineLoader())
		refs, fasts = map[string]*tiktoken.Tiktoken{}, map[string]*Encoding{}
		for _, name := range encodings {
			if refs[name], refErr = tiktoken.GetEncoding(name); refErr != nil {
				return
			}
			if fasts[name], refErr = Load(name); refErr != nil {
				return
			}
		}
	})
	if refErr != nil {
		t.Fatal(refErr)
	}
	return refs, fasts
}

// same fails t unless the fast engine counts s as tiktoken-go does.
func same(t testing.TB, s string) {
	t.Helper()
	refs, fasts := engines(t)
	for _, name := range encodings {
		want := len(refs[name].EncodeOrdinary(s))
		got, covered := fasts[name].Count(s, time.Time{})
		if got != want || covered != len(s) {
			t.Errorf("%s: fast count of %.80q = %d (covering %d of %d bytes), tiktoken-go %d",
				name, s, got, covered, len(s), want)
		}
	}
}

// hardCases are the inputs where a pre-tokenizer is easiest to get wrong.
var hardCases = []string{
	"",
	"a", " ", "\n", "'", "1",
	"Hello, world!",
	// Contractions in every case, inside and outside words.
	"I'm you're they've she'll he'd it's don't",
	"I'M YOU'RE THEY'VE SHE'LL HE'D IT'S DON'T",
	"I'm'S 'tis 'Twas 'S 's 'Re 'rE 'LL 'lL 'x rock'n'roll o'clock '''s",
	"HELLO'S HELLO'Ss Hello'S hELLO's ÉCOLE'S",
	// Letters: case runs, titlecase, modifiers, CJK, scripts without spaces.
	"camelCase PascalCase HTTPServer XMLHttpRequest iOS macOS ǅungla Ǆ ǅǆ",
	"ʰʲ modifier ˢᵘᵖ ꜰ ß ẞ ŉ ﬁ",
	"日本語のテキストです。東京タワー！ 한국어 텍스트 中文，标点。",
	// Words of several characters that are tokens, beside characters that
	// are not and characters that are tokens alone (cuts.go's places).
	"中华人民共和国成立于一九四九年十月一日，人工智能大模型的推理服务龘靐齉",
	"ありがとうございます。今日はいい天気ですね、東京都庁舎の展望室へ",
	"ภาษาไทยไม่มีช่องว่าง हिन्दी العربية עברית Ελληνικά Русский",
	// Numbers in every script and run length.
	"1 12 123 1234 12345 1234567890 3.14 1e-9 0x1F ①②③④ ⅠⅡⅫ ½¾ ٣٤٥٦ ६७८९ １２３４",
	"a1b22c333d4444 x123456789y",
	// Marks: combining, enclosing, on letters and alone.
	"e\u0301 a\u0308 q\u0303 Z\u0324\u032a\u0316\u036b\u034a\u031a \u0301\u0301 \u20dd x \u0301a",
	"\u0301abc \u0300ABC \u0301A. \u0301\u0301\u0301. ab\u0301cd AB\u0301CD",
	// Emoji, ZWJ sequences, flags, skin tones, variation selectors.
	"👩\u200d💻 👨\u200d👩\u200d👧\u200d👦 🏳\ufe0f\u200d🌈 🇯🇵 👋🏽 ❤\ufe0f 🚀code",
	// Whitespace: runs, tabs, CR LF, Unicode spaces, at the end.
	"   lots   of   spaces   ",
	"a\n\nb\r\n\r\nc \n d\t\t\te   \n\n   f",
	"x  \u00a0\u2003\u3000 y\u0085z\u2028w\u2029v \u000b\u000c",
	strings.Repeat(" ", 1000) + "x" + strings.Repeat("\n", 300) + strings.Repeat("\t ", 200),
	"trailing\n  ", "  leading", " \n", "\n ", " !", " !!\n\n", "!?\r\n/x", "a//b ///\n\n//",
	// Punctuation runs and symbols.
	"!!! ??? ... --- *** ### /// \\\\\\ ||| ~~~ ::: ((( ))) {{{ }}} <<< >>> ``` @@@ $$$",
	"∀x ∈ ℝ, ∃y: x² + y² ≤ 1 ⇒ |x| ≤ 1; ∑ ∫₀^∞ e^{-x} dx",
	"$1,299.99 €45,00 £3.50 ¥10,000 ₹2,500",
	// Code and JSON.
	"func (s *Server) Handle(w http.ResponseWriter, r *http.Request) {\n\tif err := s.check(r); err != nil {\n\t\treturn\n\t}\n}\n",
	`{"role":"user","content":"Hi!\n\tTab"} [1,2,3] {"a":{"b":null}}`,
	"def f(x):\n    return x**2  # square\n\n\nclass A(B):\n    pass\n",
	// Zero-width and format characters.
	"a\u200bb c\u200cd e\u200df \ufeffg soft\u00adhyphen \u2060",
	// Special-token text is ordinary text.
	"<|endoftext|> <|im_start|>user\nhi<|im_end|>",
	// Invalid UTF-8: lone continuation bytes, truncated sequences,
	// surrogates, overlongs.
	"\xff", "a\xffb", "\xe2\x82", "caf\xc3", "\xed\xa0\x80 x", "\xc0\xaf", "\x80\x80\x80abc", "ok \xf0\x9f\x98 ok",
	// Long single pieces: the heap merge.
	strings.Repeat("a", 5000),
	strings.Repeat("!", 3000),
	strings.Repeat("ab", 700),
	strings.Repeat("東", 2000),
	strings.Repeat("9", 1001),
	strings.Repeat("x\u0301", 300),
}

func TestFastMatchesTiktoken(t *testing.T) {
	for _, s := range hardCases {
		same(t, s)
	}
}

func TestFastMatchesTiktokenOnCorpus(t *testing.T) {
	for name, text := range corpus(t) {
		t.Run(name, func(t *testing.T) {
			same(t, text)
			// And every line alone, so that errors name a short input.
			for _, line := range strings.SplitAfter(text, "\n") {
				same(t, line)
			}
		})
	}
}

// TestFastMatchesTiktokenRandom compares the engines on texts drawn from an
// alphabet of the pieces that matter to the pre-tokenizers.
func TestFastMatchesTiktokenRandom(t *testing.T) {
	alphabet := []string{
		"a", "B", "é", "É", "ǅ", "ʰ", "ß", "İ", "x", "HELLO", "Hello", "hello",
		"'s", "'S", "'ll", "'RE", "'", "'d", "'t", "'m", "'ve",
		" ", "  ", "\n", "\r\n", "\r", "\t", "\v", "\f", "\u00a0", "\u2003", "\u0085", "\u3000",
		"1", "12345", "٣", "Ⅻ", "½", "１",
		"!", "...", "/", "//", "-", "_", "\"", "{", "}", "$", "€", "ﷺ",
		"東", "京", "ー", "ア", "の", "한국어", "ا", "ب", "ภา",
		"😀", "👩\u200d💻", "🏳️\u200d🌈", "\u200b", "\ufeff", "\u200d",
		"\u0301", "\u0300a", "q\u0303", "\u20dd",
		"\xff", "\xe2\x82", "\xed\xa0\x80",
	}
	rng := rand.New(rand.NewPCG(1, 2))
	n := 3000
	if testing.Short() {
		n = 300
	}
	for range n {
		var b strings.Builder
		for k := rng.IntN(16); k >= 0; k-- {
			b.WriteString(alphabet[rng.IntN(len(alphabet))])
		}
		same(t, b.String())
		if t.Failed() {
			return
		}
	}
}

// TestMergeLargeMatchesSmall checks the heap merge against the scan on the
// pieces both can take, including ones that repeat pairs (ties by rank).
func TestMergeLargeMatchesSmall(t *testing.T) {
	_, fasts := engines(t)
	rng := rand.New(rand.NewPCG(3, 4))
	letters := "aabbeeinrst  .!東😀"
	for _, name := range encodings {
		e := fasts[name]
		for range 2000 {
			var b strings.Builder
			for k := 2 + rng.IntN(smallPiece-2); b.Len() < k; {
				b.WriteByte(letters[rng.IntN(len(letters))])
			}
			p := b.String()[:min(b.Len(), smallPiece)]
			small := e.mergeSmall(p)
			if large, ok := e.mergeLarge(p, time.Time{}); !ok || small != large {
				t.Fatalf("%s %q: scan merge %d parts, heap merge %d", name, p, small, large)
			}
		}
	}
}

// TestClasses checks the rune classes the pre-tokenizers use against the
// unicode package for every rune, including the shortcuts for CJK.
// TestClassesMatchRegexp2: the split functions' rune classes and the
// contraction rule agree with regexp2, the engine tiktoken-go runs the
// encodings' patterns with, on every rune of the Basic Multilingual Plane
// and every seventh rune past it (regexp2 is slow, the race detector more
// so; TestClasses covers every rune against the unicode package).
func TestClassesMatchRegexp2(t *testing.T) {
	checks := []struct {
		pattern string
		has     func(c uint8) bool
	}{
		{`^[^\r\n\p{L}\p{N}]$`, isP},
		{`^[^\s\p{L}\p{N}]$`, isQ},
		{`^\p{L}$`, func(c uint8) bool { return c&cLetter != 0 }},
		{`^\p{N}$`, func(c uint8) bool { return c&cNumber != 0 }},
		{`^\s$`, func(c uint8) bool { return c&cSpace != 0 }},
		{`^[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]$`, func(c uint8) bool { return c&cUpper != 0 }},
		{`^[\p{Ll}\p{Lm}\p{Lo}\p{M}]$`, func(c uint8) bool { return c&cLower != 0 }},
		{`^[\r\n]$`, func(c uint8) bool { return c&cNewline != 0 }},
	}
	res := make([]*regexp2.Regexp, len(checks))
	for i, c := range checks {
		res[i] = regexp2.MustCompile(c.pattern, 0)
	}
	contractions := regexp2.MustCompile(`^(?i:'s|'t|'re|'ve|'m|'ll|'d)`, 0)
	for r := rune(0); r <= unicode.MaxRune; r++ {
		if r >= 0xD800 && r <= 0xDFFF || r >= 0x40000 && r < 0xE0000 || r > 0xFFFF && r%7 != 0 {
			continue // surrogates; unassigned planes; a sample past the BMP
		}
		s := string(r)
		c, _ := class(s, 0)
		for i, chk := range checks {
			if m, _ := res[i].MatchString(s); m != chk.has(c) {
				t.Fatalf("%U: regexp2 %s %v, split classes %v", r, chk.pattern, m, chk.has(c))
			}
		}
		if r < 0x3000 || unicode.ToLower(r) != r {
			for _, pre := range []string{"'", "'l", "'r", "'v"} {
				x := pre + s
				want := 0
				if m, _ := contractions.FindStringMatch(x); m != nil {
					want = len(string([]rune(x)[:m.Length]))
				}
				if got := contraction(x, 0); got != want {
					t.Fatalf("contraction(%+q) = %d, regexp2 matches %d bytes", x, got, want)
				}
			}
		}
	}
}

func TestClasses(t *testing.T) {
	for r := rune(0); r <= unicode.MaxRune; r++ {
		if r >= 0xD800 && r <= 0xDFFF {
			continue // not encodable in UTF-8
		}
		s := string(r)
		got, n := class(s, 0)
		if n != len(s) || got != classOf(r) {
			t.Fatalf("class(%U) = %b, %d bytes; want %b, %d", r, got, n, classOf(r), len(s))
		}
		// (?i) lowers the text with unicode.ToLower; contraction only
		// looks at ASCII, which holds if no other rune lowers to one of
		// the contractions' letters.
		if r >= utf8.RuneSelf && strings.ContainsRune("stmdrvel", unicode.ToLower(r)) {
			t.Fatalf("%U lowers to %q: contraction must accept it", r, unicode.ToLower(r))
		}
	}
}

// TestFastNoAllocs checks that counting valid text allocates nothing.
func TestFastNoAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector makes sync.Pool drop items; make bench-tokenizer reports allocations without it")
	}
	_, fasts := engines(t)
	texts := corpus(t)
	texts["long piece"] = strings.Repeat("!", 3000)
	for _, name := range encodings {
		for tn, text := range texts {
			e := fasts[name]
			e.Count(text, time.Time{}) // warm the scratch pool
			if a := testing.AllocsPerRun(20, func() { e.Count(text, time.Time{}) }); a != 0 {
				t.Errorf("%s %s: %.1f allocations per count, want 0", name, tn, a)
			}
		}
	}
}

// FuzzCount compares the engines on any input. Its seed corpus is in
// testdata/fuzz/FuzzCount; make fuzz-tokenizer runs it for ten minutes.
func FuzzCount(f *testing.F) {
	for _, s := range hardCases {
		if len(s) < 200 {
			f.Add(s)
		}
	}
	f.Fuzz(func(t *testing.T, s string) {
		same(t, s)
	})
}

// corpus returns the benchmark corpus: tokenizer/testdata/corpus, one text
// a file.
func corpus(t testing.TB) map[string]string {
	t.Helper()
	dir := filepath.Join("..", "..", "testdata", "corpus")
	files, err := filepath.Glob(filepath.Join(dir, "*"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no corpus in %s: %v", dir, err)
	}
	texts := map[string]string{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		texts[strings.SplitN(filepath.Base(f), ".", 2)[0]] = string(b)
	}
	return texts
}

// TestRankTable: every token of both vocabularies is found with its rank
// (through the short table, the filter and the main table), and keys that
// differ from a token by one byte or in length are found only when they
// are tokens themselves.
func TestRankTable(t *testing.T) {
	for _, name := range encodings {
		loaded, err := tiktokenloader.NewOfflineLoader().LoadTiktokenBpe(encodingFiles[name])
		if err != nil {
			t.Fatal(err)
		}
		rt := newRankTable(loaded)
		want := func(key string) uint32 {
			if r, ok := loaded[key]; ok {
				return uint32(r)
			}
			return noRank
		}
		for tok, rank := range loaded {
			if got := rt.get(tok); got != uint32(rank) {
				t.Fatalf("%s: rank of %q = %d, want %d", name, tok, got, rank)
			}
			b := []byte(tok)
			b[len(b)-1] ^= 0x20
			for _, key := range []string{string(b), tok + "\x00", tok + "e", tok[:len(tok)-1] + "\xff"} {
				if got := rt.get(key); got != want(key) {
					t.Fatalf("%s: rank of %q = %d, want %d", name, key, got, want(key))
				}
			}
		}
	}
}

// TestLetters checks letters, which reads eight bytes at a time, against
// the byte-at-a-time loop it stands for: every byte value at every place of
// a word longer than eight bytes.
func TestLetters(t *testing.T) {
	want := func(s string, j int) int {
		for j < len(s) && asciiLetter[s[j]] {
			j++
		}
		if j < len(s) && s[j] >= utf8.RuneSelf {
			return run(s, j, cLetter)
		}
		return j
	}
	for b := range 256 {
		for at := range 20 {
			word := []byte("abcdefghijKLMNOPQRSTuvwxyz")
			word[at] = byte(b)
			for _, s := range []string{string(word), string(word) + "é", "ÿ" + string(word)} {
				for j := range 3 {
					if got, w := letters(s, j), want(s, j); got != w {
						t.Fatalf("letters(%q, %d) = %d, want %d", s, j, got, w)
					}
				}
			}
		}
	}
}
