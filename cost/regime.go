package cost

import "math"

// A host's regime is how its time to first token follows from what is
// already there when a request arrives. Engines differ: one that prefills a
// request after another (chunked prefill sharing a token budget) makes a
// prompt wait for every prompt queued before it; one that runs each
// request in a slot of its own makes it wait for a free slot, and may slow
// every running request as its batch fills. Rather than assume either, each
// host's regime is learned by least squares over its own finished
// requests:
//
//	TTFT ≈ base + own·U + crowd·U·n + busy·n + queue·max(0, n+1-S) + ahead·A + decode·D
//
//	U  prompt tokens the request made the host prefill (its own count,
//	   less what its cache held), in thousands
//	n  requests in flight there when it arrived
//	S  how many requests the host runs at once before others wait
//	A  prompt tokens still to prefill there (of the requests waiting for
//	   their first token: their uncached tokens in the host's count), in
//	   thousands
//	D  seconds of decoding expected of the requests in flight there
//
// own is the host's prefill time per thousand tokens; crowd how much each
// request in flight slows a prefill (a load factor) and busy what each adds
// whatever the prompt (a share of a batch step); queue what each request
// beyond its slots adds (the wait for one to end); ahead how much queued
// prefill delays a new one (about own when prefills run one after another,
// about 0 when each has a slot); decode how much running requests delay it
// (small for a wide continuous batch, large when slots are few and full).
// Every coefficient is kept at 0 or above. The slots S are learned by
// fitting the regime for each of slotChoices and scoring each fit on the
// requests before it saw them: the fleet keeps the closest (a limit only
// when clearly closer than none), and a host keeps the fleet's unless its
// own observations clearly favour another.

// Features of one observation, in the order of the coefficients.
const (
	featBase = iota
	featOwn
	featCrowd
	featBusy
	featQueue
	featAhead
	featDecode
	features
)

// featureNames name the coefficients, for /debug/hosts.
var featureNames = [features]string{"base_seconds", "own_seconds_per_1k_tokens", "crowd_seconds_per_1k_tokens_per_request",
	"busy_seconds_per_request", "queue_seconds_per_request_beyond_slots", "ahead_seconds_per_1k_tokens", "decode_seconds_per_second"}

// typical is each feature's typical size: the prior's pull on a
// coefficient is that of observations of this size.
var typical = [features]float64{featBase: 1, featOwn: 1, featCrowd: 4, featBusy: 4, featQueue: 2, featAhead: 2, featDecode: 2}

// slotChoices are the slot counts a regime is fitted for; 0 is no limit.
var slotChoices = [...]int{0, 1, 2, 4, 8, 16, 32, 64, 128}

// minChoose is how many observations fits must have seen before the
// slots are chosen by their errors (until then: the default).
const minChoose = 20

// queued returns the queue feature: requests in flight beyond slots, this
// one included (0 without a limit).
func queued(slots int, inFlight int64) float64 {
	if slots == 0 {
		return 0
	}
	return float64(max(0, inFlight+1-int64(slots)))
}

// regimes are a host's (or the fleet's) regime fitted for each of
// slotChoices, with how far each predicted the requests before it fitted
// them, and the one chosen.
type regimes struct {
	fits   [len(slotChoices)]regime
	errs   [len(slotChoices)]float64 // faded mean of squared errors (seconds²)
	seen   int                       // observations
	chosen int                       // into slotChoices
}

// newRegimes returns regimes that start as prior: its fits and its
// choice of slots.
func newRegimes(prior *regimes) regimes {
	var r regimes
	for k := range r.fits {
		r.fits[k].theta = prior.fits[k].theta
	}
	r.chosen = prior.chosen
	return r
}

// add folds in one observation: x without its queue feature, inFlight the
// requests there when it arrived, y its time to first token (seconds), w
// its weight in the fits. Each fit is scored on it before it is fitted
// (fading by keep), then fitted toward the same slots' fit of prior
// (see regime.fit for pool). The slots chosen are def (an index into
// slotChoices) unless another choice's error is clearly smaller.
func (r *regimes) add(x [features]float64, inFlight int64, y, w, keep float64, prior *regimes, pool float64, def int) {
	r.seen++
	best := 0
	for k, slots := range slotChoices {
		x[featQueue] = queued(slots, inFlight)
		f := &r.fits[k]
		// Absolute errors choose the slots: it is the long waits that a
		// slot limit explains, and a relative error would weigh the noise
		// of the shortest requests as much.
		e := predict(f.theta, x) - y
		r.errs[k] = r.errs[k]*keep + e*e*(1-keep)
		f.add(x, y, w, keep)
		f.fit(prior.fits[k].theta, pool)
		if r.errs[k] < r.errs[best] {
			best = k
		}
	}
	// Another choice must predict clearly better than the default to be
	// believed: where no limit binds, every choice fits about as well.
	r.chosen = def
	if r.seen >= minChoose && r.errs[best] < slotGain*r.errs[def] {
		r.chosen = best
	}
}

// slotGain is how much smaller another choice's error must be than the
// default's to be believed.
const slotGain = 0.8

// current returns the chosen slots (0: no limit) and their fit.
func (r *regimes) current() (slots int, theta [features]float64) {
	return slotChoices[r.chosen], r.fits[r.chosen].theta
}

// priorObs is how many observations' worth the fleet's prior counts at
// first.
const priorObs = 4

// hostPool is how many observations' worth the fleet's fit always counts
// in a host's.
const hostPool = 4

// regime is what is known of one host's regime (or the fleet's): a
// least-squares fit whose observations fade by a factor each time a new one
// comes, pulled toward a prior as strongly as priorObs observations.
type regime struct {
	a      [features][features]float64 // faded Σ x xᵀ
	b      [features]float64           // faded Σ x y
	weight float64                     // faded number of observations
	theta  [features]float64           // the fit, 0 or above
}

// add folds in observation x with time to first token y (seconds), after
// fading what was there by keep.
func (r *regime) add(x [features]float64, y, w, keep float64) {
	for i := range features {
		for j := range features {
			r.a[i][j] = r.a[i][j]*keep + w*x[i]*x[j]
		}
		r.b[i] = r.b[i]*keep + w*x[i]*y
	}
	r.weight = r.weight*keep + w
}

// fit solves for the coefficients, pulled toward prior, and keeps them at
// 0 or above (a coefficient the unconstrained fit puts below 0 is fixed at
// 0 and the rest fitted again, one at a time). With pool 0, the prior weighs priorObs
// observations of typical size while there are none, and fades as they
// come (to about priorObs² of them): it settles what the observations
// cannot, such as the split between base and own when every prompt is the
// same size. With pool positive it always weighs that many: a host's fit
// stays near the fleet's unless its own observations show otherwise, so
// that the noise of a few hundred observations does not set hosts of one
// fleet apart.
func (r *regime) fit(prior [features]float64, pool float64) {
	pull := pool
	if pull <= 0 {
		pull = priorObs * priorObs / (priorObs + r.weight)
	}
	var fixed [features]bool
	for range features {
		var a [features][features]float64
		var b [features]float64
		for i := range features {
			w := pull * typical[i] * typical[i]
			a[i] = r.a[i]
			a[i][i] += w
			b[i] = r.b[i] + w*prior[i]
		}
		for i := range features {
			if fixed[i] {
				for j := range features {
					a[i][j], a[j][i] = 0, 0
				}
				a[i][i], b[i] = 1, 0
			}
		}
		theta, ok := solve(a, b)
		if !ok {
			return
		}
		// Fix the most negative coefficient at 0 and fit the rest again:
		// another that came out negative beside it may not be once it is
		// gone.
		worst := -1
		for i, v := range theta {
			if v < 0 && (worst < 0 || v < theta[worst]) {
				worst = i
			}
		}
		if worst < 0 {
			r.theta = theta
			return
		}
		fixed[worst] = true
	}
}

// solve solves a·θ = b by Gaussian elimination with partial pivoting; ok
// is false when a is singular.
func solve(a [features][features]float64, b [features]float64) (theta [features]float64, ok bool) {
	for c := range features {
		p := c
		for r := c + 1; r < features; r++ {
			if math.Abs(a[r][c]) > math.Abs(a[p][c]) {
				p = r
			}
		}
		if math.Abs(a[p][c]) < 1e-12 {
			return theta, false
		}
		a[c], a[p] = a[p], a[c]
		b[c], b[p] = b[p], b[c]
		for r := c + 1; r < features; r++ {
			f := a[r][c] / a[c][c]
			for k := c; k < features; k++ {
				a[r][k] -= f * a[c][k]
			}
			b[r] -= f * b[c]
		}
	}
	for c := features - 1; c >= 0; c-- {
		s := b[c]
		for k := c + 1; k < features; k++ {
			s -= a[c][k] * theta[k]
		}
		theta[c] = s / a[c][c]
	}
	return theta, true
}
