package cost

import (
	"fmt"
	"math"
	"math/rand/v2"
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
		// The decode's 2,000,000 µs is reported whatever is charged of it.
		{"two-phase", with(round, func(o *Options) { o.TwoPhase = true }),
			picker.Charge{Tokens: 1000, UntilFirstToken: 50000, UntilEnd: 1000000, Decode: 2000000}},
		{"one-phase holds both to the end", round, picker.Charge{Tokens: 1000, UntilEnd: 1050000, Decode: 2000000}},
		{"decode weight 0 charges the prompt only", with(round, func(o *Options) { o.DecodeWeight = 0 }),
			picker.Charge{Tokens: 1000, UntilEnd: 50000, Decode: 2000000}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := New(tc.opts).Cost(req, 200)(picker.HostState{Addr: "10.0.0.1:80"}); got != tc.want {
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
// host is a simulated backend that answers with a time to first token
// from what is in flight there.
type host struct {
	name  string
	ratio float64 // its tokens per tokenlb token
	// ttft is the host's time to first token for a prompt of own of its
	// tokens, behind ahead of its tokens still prefilling, in state st.
	ttft func(own, ahead float64, st picker.HostState) time.Duration
}

// teach sends m n outcomes of requests of varying sizes on varying states
// at each of hosts, the first token as the host's ttft has it, the rest at
// decode per output token.
func teach(m *Estimator, n int, decode time.Duration, hosts ...host) {
	rng := rand.New(rand.NewPCG(1, 2))
	for range n {
		for _, h := range hosts {
			tokens := 50 + rng.IntN(4000)
			st := picker.HostState{Addr: h.name, Requests: int64(rng.IntN(8)), PrefillingTokens: int64(rng.IntN(6000)),
				Decode: int64(rng.IntN(3e6))}
			st.Uncached = int64(float64(st.PrefillingTokens) * h.ratio)
			ttft := h.ttft(float64(tokens)*h.ratio, float64(st.PrefillingTokens)*h.ratio, st)
			m.Learn(Outcome{Host: h.name, Request: Request{Model: "m", Route: "chat", PromptTokens: tokens}, State: st,
				TTFT: ttft, Duration: ttft + 100*decode, PromptTokens: int(float64(tokens) * h.ratio), OutputTokens: 101,
				CachedTokens: -1})
		}
	}
}

func near(got, want float64) bool { return math.Abs(got/want-1) < 0.05 }

// serial is an engine that prefills one prompt after another: a prompt
// waits for every prompt queued before it.
func serial(perToken time.Duration) func(float64, float64, picker.HostState) time.Duration {
	return func(own, ahead float64, _ picker.HostState) time.Duration {
		return 5*time.Millisecond + time.Duration(own+ahead)*perToken
	}
}

// TestCalibration: each host's token ratio, decode speed and prefill speed
// are learned; a host never measured is charged as the fleet's average;
// without calibration every host is charged alike and nothing predicted.
func TestCalibration(t *testing.T) {
	m := New(with(round, func(o *Options) { o.Calibrate = true; o.TwoPhase = true }))
	teach(m, 300, 10*time.Millisecond, host{"fast", 1, serial(50 * time.Microsecond)}) // 20,000/s, 100/s
	teach(m, 300, 20*time.Millisecond, host{"slow", 1.5, serial(100 * time.Microsecond)})
	fast, slow := m.Speed("fast"), m.Speed("slow")
	if !near(fast.PrefillTokensPerSecond, 20000) || !near(fast.DecodeTokensPerSecond, 100) || !near(fast.TokenRatio, 1) {
		t.Errorf("fast host: %+v", fast)
	}
	if !near(slow.PrefillTokensPerSecond, 10000) || !near(slow.DecodeTokensPerSecond, 50) || !near(slow.TokenRatio, 1.5) {
		t.Errorf("slow host: %+v", slow)
	}
	cost := m.Cost(Request{PromptTokens: 1000}, 100)
	cf, cs := cost(picker.HostState{Addr: "fast"}), cost(picker.HostState{Addr: "slow"})
	// slow: 1.5 × the tokens at half the speed: 3 × the prefill, both in
	// the time to first token and in what it delays others; 2 × the decode.
	if !near(float64(cs.UntilFirstToken), 3*float64(cf.UntilFirstToken)) || !near(float64(cs.Decode), 2*float64(cf.Decode)) {
		t.Errorf("fast %+v, slow %+v", cf, cs)
	}
	if want := 5e3 + 1000*50; !near(float64(cf.Wait), want) {
		t.Errorf("predicted wait on the idle fast host %d µs, want %.0f", cf.Wait, want)
	}
	// A host never measured is charged as the fleet's average: between the
	// two, not at the configured prior.
	if u := m.Speed("new").PrefillTokensPerSecond; u <= 10000*1.05 || u >= 20000*0.95 {
		t.Errorf("unmeasured host prefill speed %v, want between the two measured ones", u)
	}

	off := New(with(round, func(o *Options) { o.TwoPhase = true }))
	teach(off, 10, 10*time.Millisecond, host{"fast", 1, serial(50 * time.Microsecond)}, host{"slow", 1.5, serial(100 * time.Microsecond)})
	c := off.Cost(Request{PromptTokens: 1000}, 100)
	if a, b := c(picker.HostState{Addr: "fast"}), c(picker.HostState{Addr: "slow"}); a != b || a.Wait != 0 {
		t.Errorf("calibration off: hosts charged %+v and %+v, want alike and nothing predicted", a, b)
	}
}

// TestRegimes: the regime of an engine that prefills one prompt after
// another, and that of one that runs each request in a slot and slows all
// of them as more run, are told apart, and each predicts its own host.
func TestRegimes(t *testing.T) {
	serialFleet := New(with(round, func(o *Options) { o.Calibrate = true; o.TwoPhase = true }))
	slottedFleet := New(with(round, func(o *Options) { o.Calibrate = true; o.TwoPhase = true }))
	slots := func(own, _ float64, st picker.HostState) time.Duration {
		// 20 ms + 0.5 ms a token, slowed by a third for each request
		// running beside it (the llm-d simulator at load factor 2, 4 slots).
		return time.Duration((20e-3 + own*0.5e-3) * (1 + float64(st.Requests)/3) * float64(time.Second))
	}
	teach(serialFleet, 400, 10*time.Millisecond, host{"serial", 1, serial(50 * time.Microsecond)})
	teach(slottedFleet, 400, 10*time.Millisecond, host{"slots", 1, slots})
	if s := serialFleet.Speed("serial").Regime; !near(s["ahead_seconds_per_1k_tokens"], 0.05) ||
		s["crowd_seconds_per_1k_tokens_per_request"] > 0.005 {
		t.Errorf("serial host: %v, want queued prefill to delay a prompt as its own does, and no crowding", s)
	}
	s := slottedFleet.Speed("slots").Regime
	if s["ahead_seconds_per_1k_tokens"] > 0.01 || !near(s["own_seconds_per_1k_tokens"], 0.5) ||
		!near(s["crowd_seconds_per_1k_tokens_per_request"], 0.5/3) {
		t.Errorf("slotted host: %v, want no delay from queued prefill, 0.5 s per 1,000 tokens and a sixth of that per request there", s)
	}
	for name, v := range s {
		if v < 0 {
			t.Errorf("coefficient %s is %v, below 0", name, v)
		}
	}
	m := slottedFleet
	busy := picker.HostState{Addr: "slots", Requests: 3}
	want := (20e-3 + 1.0) * 2 // 2,000 tokens beside 3 others
	if got := float64(m.Cost(Request{PromptTokens: 2000}, 10)(busy).Wait) / 1e6; math.Abs(got/want-1) > 0.15 {
		t.Errorf("predicted %.2f s on the busy slotted host, want about %.2f", got, want)
	}
}

// TestCachedTokensAreNotPrefill: a host whose prefix cache holds most of
// each prompt is learned at its speed for the tokens it prefilled, not as
// a fast host.
func TestCachedTokensAreNotPrefill(t *testing.T) {
	m := New(with(round, func(o *Options) { o.Calibrate = true }))
	rng := rand.New(rand.NewPCG(3, 4))
	for range 300 {
		tokens := 500 + rng.IntN(4000)
		cached := rng.IntN(tokens)
		ttft := time.Duration(tokens-cached) * 100 * time.Microsecond
		m.Learn(Outcome{Host: "h", Request: Request{PromptTokens: tokens}, TTFT: ttft, Duration: ttft,
			PromptTokens: tokens, CachedTokens: cached})
	}
	if got := m.Speed("h").PrefillTokensPerSecond; !near(got, 10000) {
		t.Fatalf("prefill speed %.0f tokens/s, want 10,000 on the tokens prefilled", got)
	}
}

// TestSpread: until predictions are checked there is no spread (the prior
// is the fixed model). Then it is how wrong they were where the hosts' state
// does not tell in the times to first token (all as if idle), and much
// less where it does and the predictions use it.
func TestSpread(t *testing.T) {
	if New(round).Spread() != 0 {
		t.Fatal("a model that predicts nothing has a spread")
	}
	if got := New(with(round, func(o *Options) { o.Calibrate = true })).Spread(); got != 0 {
		t.Fatalf("spread %v before any prediction, want 0 (the prior ranks by load)", got)
	}
	learn := func(state bool) *Estimator {
		m := New(with(round, func(o *Options) { o.Calibrate = true }))
		rng := rand.New(rand.NewPCG(5, 6))
		for i := range 300 {
			n := int64(rng.IntN(10))
			ttft := 10 * time.Millisecond
			if state {
				ttft *= time.Duration(1 + n) // 10 ms for each request there
			}
			// Predicted 20% off, one way or the other.
			pred := ttft * 6 / 5
			if i%2 == 1 {
				pred = ttft * 4 / 5
			}
			m.Learn(Outcome{Host: "h", Request: Request{PromptTokens: 100}, State: picker.HostState{Addr: "h", Requests: n},
				Predicted: pred, TTFT: ttft, Duration: ttft, CachedTokens: -1})
		}
		return m
	}
	if got := learn(false).Spread(); math.Abs(got-0.2) > 0.01 {
		t.Errorf("spread %v where the state does not tell, want the error, 0.2", got)
	}
	if got := learn(true).Spread(); got > 0.05 {
		t.Errorf("spread %v where predictions use the state, want well under the error", got)
	}
	m := learn(true)
	if s := m.Speed("h"); s.Predictions != errorWindowSize || math.Abs(s.PredictionError-0.2) > 0.01 {
		t.Fatalf("host's prediction error %v over %d, want 0.2 over %d", s.PredictionError, s.Predictions, errorWindowSize)
	}
}

// TestForget: a host that left the fleet and comes back is charged as the
// fleet's average, not as it was learned before.
func TestForget(t *testing.T) {
	m := New(with(round, func(o *Options) { o.Calibrate = true; o.TwoPhase = true }))
	teach(m, 300, 10*time.Millisecond, host{"fast", 1, serial(50 * time.Microsecond)})
	teach(m, 300, 20*time.Millisecond, host{"slow", 1.5, serial(100 * time.Microsecond)})
	fleet := m.Speed("never seen").PrefillTokensPerSecond
	if near(m.Speed("fast").PrefillTokensPerSecond, fleet) {
		t.Fatal("the fast host was not learned apart from the fleet")
	}
	m.Forget("fast")
	if got := m.Speed("fast").PrefillTokensPerSecond; got != fleet {
		t.Fatalf("after Forget: %v tokens/s, want the fleet's %v", got, fleet)
	}
	if near(m.Speed("slow").PrefillTokensPerSecond, fleet) {
		t.Fatal("Forget dropped another host")
	}
}

func TestCalibrationIgnoresWildSamples(t *testing.T) {
	m := New(with(round, func(o *Options) { o.Calibrate = true }))
	m.Learn(Outcome{Host: "h", Request: Request{PromptTokens: 1}, TTFT: time.Hour, PromptTokens: 1e6, CachedTokens: -1})
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
	long := Outcome{Request: Request{PromptTokens: 1000}, TTFT: 55 * time.Millisecond, Duration: 100 * time.Millisecond, CachedTokens: -1}
	longer := Outcome{Request: Request{PromptTokens: 3000}, TTFT: 155 * time.Millisecond, Duration: 200 * time.Millisecond, CachedTokens: -1}
	short := Outcome{Request: Request{PromptTokens: 20}, TTFT: 6 * time.Millisecond, Duration: 50 * time.Millisecond, CachedTokens: -1}
	for range 200 {
		for _, h := range []string{"a", "b"} {
			long.Host, longer.Host = h, h
			m.Learn(long)
			m.Learn(longer)
		}
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

// TestSlots: a host that runs 4 requests at once and makes the rest wait
// (a second for each ahead of it beyond its slots) is learned to have 4
// slots, and a request arriving at its fifth in flight is predicted to wait.
func TestSlots(t *testing.T) {
	m := New(with(round, func(o *Options) { o.Calibrate = true; o.TwoPhase = true }))
	slotted := func(own, _ float64, st picker.HostState) time.Duration {
		wait := float64(max(0, st.Requests+1-4))
		return time.Duration((20e-3 + own*0.5e-3 + wait) * float64(time.Second))
	}
	teach(m, 300, 10*time.Millisecond, host{"h", 1, slotted}, host{"serial", 1, serial(50 * time.Microsecond)})
	if s := m.Speed("h"); s.Slots != 4 {
		t.Fatalf("learned %d slots (%v), want 4", s.Slots, s.Regime)
	}
	if s := m.Speed("serial"); s.Slots != 0 && s.Slots < 8 {
		t.Errorf("a host without a slot limit learned %d slots", s.Slots)
	}
	c := m.Cost(Request{PromptTokens: 1000}, 10)
	idle, full := c(picker.HostState{Addr: "h", Requests: 2}), c(picker.HostState{Addr: "h", Requests: 5})
	if got := float64(full.Wait-idle.Wait) / 1e6; math.Abs(got-2) > 0.2 {
		t.Fatalf("predicted %.2f s more with 5 in flight than with 2, want about 2 (two ahead beyond the slots)", got)
	}
}

// TestCacheTrust: a host whose cache holds only half of what the prefix
// table says it served is predicted to prefill the other half.
func TestCacheTrust(t *testing.T) {
	m := New(with(round, func(o *Options) { o.Calibrate = true }))
	for range 200 {
		// The table says 80% is held; the host reports 40% cached.
		st := picker.HostState{Addr: "h", PrefixShare: 0.8}
		ttft := time.Duration(600) * 50 * time.Microsecond // 600 of 1,000 tokens prefilled
		m.Learn(Outcome{Host: "h", Request: Request{PromptTokens: 1000}, State: st, TTFT: ttft, Duration: ttft,
			PromptTokens: 1000, CachedTokens: 400})
	}
	if got := m.Speed("h").CacheTrust; !near(got, 0.5) {
		t.Fatalf("cache trust %v, want 0.5", got)
	}
	got := m.Cost(Request{PromptTokens: 1000}, 1)(picker.HostState{Addr: "h", PrefixShare: 0.8}).Wait
	if want := 600 * 50.0; math.Abs(float64(got)/want-1) > 0.1 {
		t.Fatalf("predicted %d µs, want about %.0f (600 tokens prefilled)", got, want)
	}
}
