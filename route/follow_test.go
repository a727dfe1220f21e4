package route

import (
	"fmt"
	"testing"
	"time"
)

// TestFollow: a streamed response is followed to its end when its host had
// none followed within FollowInterval, each host on its own clock; 0
// follows every response, a negative interval none.
func TestFollow(t *testing.T) {
	t0 := time.Unix(1000, 0)
	type call struct {
		host string
		at   time.Duration // after t0
		want bool
	}
	for _, tc := range []struct {
		name     string
		interval time.Duration
		calls    []call
	}{
		{"every response", 0, []call{{"a", 0, true}, {"a", 0, true}, {"a", time.Millisecond, true}}},
		{"none", -time.Second, []call{{"a", 0, false}, {"b", time.Hour, false}}},
		{"one a second a host", time.Second, []call{
			{"a", 0, true},                        // a host's first
			{"a", 500 * time.Millisecond, false},  // within the interval
			{"b", 600 * time.Millisecond, true},   // another host: its own clock
			{"a", 999 * time.Millisecond, false},  // still within
			{"a", time.Second, true},              // the interval has passed
			{"b", 1500 * time.Millisecond, false}, // b's last was at 600 ms
			{"a", 1500 * time.Millisecond, false}, // a's last was at 1 s
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rt := New(Config{FollowInterval: tc.interval})
			for i, c := range tc.calls {
				if got := rt.follow(c.host, t0.Add(c.at)); got != c.want {
					t.Fatalf("call %d (%s at %v): follow %v, want %v", i, c.host, c.at, got, c.want)
				}
			}
		})
	}
}

// TestFollowForgetsGoneHosts: the hosts' clocks are bounded: once there are
// maxFollowed, those idle for over a minute (removed hosts) are dropped.
func TestFollowForgetsGoneHosts(t *testing.T) {
	rt := New(Config{FollowInterval: time.Second})
	t0 := time.Unix(1000, 0)
	for i := range maxFollowed {
		rt.follow(fmt.Sprintf("10.0.0.%d:8000", i), t0)
	}
	rt.follow("fresh:8000", t0.Add(2*time.Minute))
	if n := len(rt.followed); n != 1 {
		t.Fatalf("%d hosts remembered, want 1 (the old ones dropped)", n)
	}
	if rt.follow("fresh:8000", t0.Add(2*time.Minute+time.Millisecond)) {
		t.Fatal("the host just followed was followed again within its interval")
	}
}
