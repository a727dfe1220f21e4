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
//	TTFT ≈ base + own·U + crowd·U·n + busy·n + ahead·A + decode·D
//
//	U  prompt tokens the request made the host prefill (its own count,
//	   less what its cache held), in thousands
//	n  requests in flight there when it arrived
//	A  prompt tokens still waiting for their first token there, in
//	   thousands (the host's count)
//	D  seconds of decoding expected of the requests in flight there
//
// own is the host's prefill time per thousand tokens; crowd how much each
// request in flight slows a prefill (a load factor) and busy what each adds
// whatever the prompt (a share of a batch step, a wait for a slot); ahead
// how much queued prefill delays a new one (about own when prefills run one
// after another, about 0 when each has a slot); decode how much running
// requests delay it (small for a wide continuous batch, large when slots
// are few and full). Every coefficient is kept at 0 or above.

// Features of one observation, in the order of the coefficients.
const (
	featBase = iota
	featOwn
	featCrowd
	featBusy
	featAhead
	featDecode
	features
)

// featureNames name the coefficients, for /debug/hosts.
var featureNames = [features]string{"base_seconds", "own_seconds_per_1k_tokens", "crowd_seconds_per_1k_tokens_per_request",
	"busy_seconds_per_request", "ahead_seconds_per_1k_tokens", "decode_seconds_per_second"}

// typical is each feature's typical size: the prior's pull on a
// coefficient is that of observations of this size.
var typical = [features]float64{featBase: 1, featOwn: 1, featCrowd: 4, featBusy: 4, featAhead: 2, featDecode: 2}

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
func (r *regime) add(x [features]float64, y, keep float64) {
	for i := range features {
		for j := range features {
			r.a[i][j] = r.a[i][j]*keep + x[i]*x[j]
		}
		r.b[i] = r.b[i]*keep + x[i]*y
	}
	r.weight = r.weight*keep + 1
}

// fit solves for the coefficients, pulled toward prior, and keeps them at
// 0 or above (a coefficient the unconstrained fit puts below 0 is fixed at
// 0 and the rest fitted again). The prior weighs priorObs observations of
// typical size while there are none, and fades as they come (to about
// priorObs² of them): it settles what the observations cannot, such as
// the split between base and own when every prompt is the same size.
func (r *regime) fit(prior [features]float64, priorObs float64) {
	pull := priorObs * priorObs / (priorObs + r.weight)
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
		negative := false
		for i, v := range theta {
			if v < 0 {
				fixed[i], negative = true, true
			}
		}
		if !negative {
			r.theta = theta
			return
		}
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
