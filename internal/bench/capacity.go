package bench

import (
	"context"
	"fmt"
	"slices"
	"time"
)

// MeasureCapacity returns the requests per second o's backends complete
// when they are kept busy with reqs: Envoy's least-request arm in a closed
// loop with enough clients to fill every backend's slots twice over (16
// each for llmsim, whose batch is not what limits it), counted between the
// completion of the 20th and of the 80th percent of the requests, so that
// neither the start nor the drain counts.
func MeasureCapacity(ctx context.Context, o Options, reqs []Request) (float64, error) {
	perHost := 16
	if o.Backend.Kind == "llmd-sim" {
		perHost = 2 * o.Backend.Slots
	}
	o.Concurrency, o.Replicas, o.Direct, o.KillAt = o.Backends*perHost, 1, 0, 0
	res, err := RunArm(ctx, o, "envoy-least-request", reqs)
	if err != nil {
		return 0, err
	}
	if res.Errors > 0 {
		// Fast failures would pass for capacity.
		return 0, fmt.Errorf("bench: %d of %d requests failed while measuring capacity: the backends refuse this load (--logs keeps their logs)",
			res.Errors, len(reqs))
	}
	ends := slices.Clone(res.ends)
	slices.SortFunc(ends, time.Time.Compare)
	lo, hi := len(ends)/5, len(ends)*4/5
	if hi-lo < 10 {
		return 0, fmt.Errorf("bench: %d of %d requests completed: too few to measure capacity", len(ends), len(reqs))
	}
	return float64(hi-lo) / ends[hi].Sub(ends[lo]).Seconds(), nil
}
