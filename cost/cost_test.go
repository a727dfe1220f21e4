package cost

import (
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/tokenlb/tokenlb/picker"
)

// Round priors make the expected charges easy to work out by hand: 1 prompt
// token = 50 µs of prefill, 1 output token = 10 ms of decode.
var round = Options{PrefillTokensPerSecond: 20000, DecodeTokensPerSecond: 100, OutputTokens: 100, DecodeWeight: 0.5}

func with(o Options, f func(*Options)) Options { f(&o); return o }

func TestCostParts(t *testing.T) {
	req := Request{Model: "m", Route: "chat", PromptTokens: 1000}
	for _, tc := range []struct {
		name string
		opts Options
		want picker.Charge
	}{
		// prefill 1000 × 50 µs = 50,000 µs; decode 200 × 10 ms × 0.5 = 1,000,000 µs.
		{"two-phase", with(round, func(o *Options) { o.TwoPhase = true }),
			picker.Charge{Tokens: 1000, UntilFirstToken: 50000, UntilEnd: 1000000}},
		{"one-phase holds both to the end", round, picker.Charge{Tokens: 1000, UntilEnd: 1050000}},
		{"decode weight 0 charges the prompt only", with(round, func(o *Options) { o.DecodeWeight = 0 }),
			picker.Charge{Tokens: 1000, UntilEnd: 50000}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := New(tc.opts).Cost(req, 200)("10.0.0.1:80"); got != tc.want {
				t.Fatalf("charge %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestOutputEstimate(t *testing.T) {
	chat := Request{Model: "m", Route: "chat"}
	capped := Request{Model: "m", Route: "chat", MaxOutputTokens: 30}
	other := Request{Model: "other", Route: "chat"}

	off := New(round)
	off.Learn(Outcome{Request: chat, OutputTokens: 20})
	if got := off.Output(chat); got != 100 {
		t.Errorf("estimation off: %d, want the prior 100", got)
	}
	if got := off.Output(capped); got != 30 {
		t.Errorf("estimation off with max_tokens 30: %d, want 30", got)
	}

	on := New(with(round, func(o *Options) { o.EstimateOutput = true }))
	if got := on.Output(chat); got != 100 {
		t.Errorf("nothing learned: %d, want the prior 100", got)
	}
	for range 200 {
		on.Learn(Outcome{Request: chat, OutputTokens: 20})
	}
	if got := on.Output(chat); got < 20 || got > 24 {
		t.Errorf("after 200 responses of 20 tokens: %d, want about 20", got)
	}
	if got := on.Output(Request{Model: "m", Route: "chat", MaxOutputTokens: 500}); got > 24 {
		t.Errorf("a high max_tokens is a cap, not an estimate: %d", got)
	}
	if got := on.Output(Request{Model: "m", Route: "chat", MaxOutputTokens: 10}); got != 10 {
		t.Errorf("max_tokens 10 caps the estimate: %d", got)
	}
	if got := on.Output(other); got != 100 {
		t.Errorf("another model learns separately: %d, want the prior", got)
	}
	if got := on.Output(Request{Model: "m", Route: "completions"}); got != 100 {
		t.Errorf("another route learns separately: %d, want the prior", got)
	}
	// A few observations move the estimate part of the way: the prior
	// counts as four.
	few := New(with(round, func(o *Options) { o.EstimateOutput = true }))
	for range 4 {
		few.Learn(Outcome{Request: chat, OutputTokens: 20})
	}
	if got := few.Output(chat); got < 55 || got > 65 {
		t.Errorf("after 4 responses of 20 tokens: %d, want about halfway from 100 (60)", got)
	}
}

func TestOutputKeysBounded(t *testing.T) {
	m := New(with(round, func(o *Options) { o.EstimateOutput = true }))
	for i := range maxOutputKeys + 100 {
		m.Learn(Outcome{Request: Request{Model: fmt.Sprint(i)}, OutputTokens: 5})
	}
	if len(m.outputs) != maxOutputKeys {
		t.Fatalf("%d learned keys, want at most %d", len(m.outputs), maxOutputKeys)
	}
}

// slowFast teaches a model that host "slow" takes twice as long as "fast"
// to prefill and to decode, and reports 1.5 of its own tokens per tokenlb
// token.
func slowFast(m *Estimator) {
	req := Request{Model: "m", Route: "chat", PromptTokens: 1000}
	for range 200 {
		// fast: 1000 tokens in 50 ms (20,000/s), 101 tokens in 1.05 s (100/s).
		m.Learn(Outcome{Host: "fast", Request: req, TTFT: 50 * time.Millisecond, Duration: 1050 * time.Millisecond,
			PromptTokens: 1000, OutputTokens: 101})
		// slow: 1500 of its tokens in 150 ms (10,000/s); 101 in 2.15 s (50/s).
		m.Learn(Outcome{Host: "slow", Request: req, TTFT: 150 * time.Millisecond, Duration: 2150 * time.Millisecond,
			PromptTokens: 1500, OutputTokens: 101})
	}
}

func near(got, want float64) bool { return math.Abs(got/want-1) < 0.02 }

func TestCalibration(t *testing.T) {
	m := New(with(round, func(o *Options) { o.Calibrate = true; o.TwoPhase = true }))
	slowFast(m)
	fast, slow := m.Speed("fast"), m.Speed("slow")
	if !near(fast.PrefillTokensPerSecond, 20000) || !near(fast.DecodeTokensPerSecond, 100) || !near(fast.TokenRatio, 1) {
		t.Errorf("fast host: %+v", fast)
	}
	if !near(slow.PrefillTokensPerSecond, 10000) || !near(slow.DecodeTokensPerSecond, 50) || !near(slow.TokenRatio, 1.5) {
		t.Errorf("slow host: %+v", slow)
	}
	cost := m.Cost(Request{PromptTokens: 1000}, 100)
	cf, cs := cost("fast"), cost("slow")
	// slow: 1.5 × the tokens at half the speed: 3 × the prefill; 2 × the decode.
	if !near(float64(cs.UntilFirstToken), 3*float64(cf.UntilFirstToken)) || !near(float64(cs.UntilEnd), 2*float64(cf.UntilEnd)) {
		t.Errorf("fast %+v, slow %+v", cf, cs)
	}
	// A host never measured is charged as the fleet's average: between the
	// two, not at the configured prior.
	if u := m.Speed("new").PrefillTokensPerSecond; u <= 10000*1.05 || u >= 20000*0.95 {
		t.Errorf("unmeasured host prefill speed %v, want between the two measured ones", u)
	}

	off := New(with(round, func(o *Options) { o.TwoPhase = true }))
	slowFast(off)
	if a, b := off.Cost(Request{PromptTokens: 1000}, 100)("fast"), off.Cost(Request{PromptTokens: 1000}, 100)("slow"); a != b {
		t.Errorf("calibration off: hosts charged differently, %+v and %+v", a, b)
	}
}

// TestCalibrationAccountsForQueue: a request that waited behind 3,000 tokens
// of other prompts does not make its host look slow.
func TestCalibrationAccountsForQueue(t *testing.T) {
	m := New(with(round, func(o *Options) { o.Calibrate = true }))
	for range 200 {
		m.Learn(Outcome{Host: "h", Request: Request{PromptTokens: 1000}, Ahead: 3000, TTFT: 200 * time.Millisecond,
			Duration: 300 * time.Millisecond})
	}
	if got := m.Speed("h").PrefillTokensPerSecond; !near(got, 20000) {
		t.Fatalf("prefill speed %v, want 20,000 (4,000 tokens in 200 ms)", got)
	}
}

func TestCalibrationIgnoresWildSamples(t *testing.T) {
	m := New(with(round, func(o *Options) { o.Calibrate = true }))
	m.Learn(Outcome{Host: "h", Request: Request{PromptTokens: 1}, TTFT: time.Hour, PromptTokens: 1e6})
	s := m.Speed("h")
	if s.TokenRatio > 4 || s.PrefillTokensPerSecond < 1 || math.IsNaN(s.PrefillTokensPerSecond) {
		t.Fatalf("one wild sample: %+v", s)
	}
}

// TestCalibrationShortPrompts: two hosts of the same speed, one of them also
// sent many short prompts whose time to first token is mostly a fixed
// overhead (a decode step, the network), are believed about as fast.
func TestCalibrationShortPrompts(t *testing.T) {
	m := New(with(round, func(o *Options) { o.Calibrate = true }))
	long := Outcome{Request: Request{PromptTokens: 1000}, TTFT: 55 * time.Millisecond, Duration: 100 * time.Millisecond}
	short := Outcome{Request: Request{PromptTokens: 20}, TTFT: 6 * time.Millisecond, Duration: 50 * time.Millisecond}
	for range 200 {
		long.Host = "a"
		m.Learn(long)
		long.Host = "b"
		m.Learn(long)
		short.Host = "b"
		for range 4 {
			m.Learn(short)
		}
	}
	a, b := m.Speed("a").PrefillTokensPerSecond, m.Speed("b").PrefillTokensPerSecond
	if b < a*0.8 {
		t.Fatalf("host sent short prompts too: %.0f prefill tokens/s, the other %.0f; want within 20%%", b, a)
	}
}
