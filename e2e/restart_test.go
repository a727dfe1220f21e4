package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tokenlb/tokenlb/internal/envoycfg"
)

// liveStream is a streamed chat request whose response has begun: the
// client has its status and first event, and the backend holds the rest.
type liveStream struct {
	id      string
	resp    *http.Response
	body    *bufio.Reader
	backend *backend
}

// startStream sends a streamed request the backend holds after its first
// event, and returns once the client has read that event.
func (s *stack) startStream(t *testing.T, id string) *liveStream {
	t.Helper()
	resp, err := s.send(context.Background(), chatBody(10, true), id, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("stream %s: status %d: %s", id, resp.StatusCode, b)
	}
	l := &liveStream{id: id, resp: resp, body: bufio.NewReader(resp.Body), backend: s.arrival(t, id)}
	if first, err := l.body.ReadString('\n'); err != nil || !strings.HasPrefix(first, "data: ") {
		t.Fatalf("stream %s: first event %q, %v", id, first, err)
	}
	return l
}

// finish releases the stream and reads it to the end: it must end with the
// backend's last event and [DONE], not be cut.
func (l *liveStream) finish() error {
	l.backend.release(l.id)
	rest, err := io.ReadAll(l.body)
	if err != nil {
		return fmt.Errorf("stream %s cut: %w (read %q)", l.id, err, rest)
	}
	if !strings.Contains(string(rest), `{"last":true}`) || !strings.HasSuffix(string(rest), "data: [DONE]\n\n") {
		return fmt.Errorf("stream %s ended early: %q", l.id, rest)
	}
	return nil
}

// signal sends sig to the process and waits for it to exit.
func (p *process) signal(t testing.TB, sig syscall.Signal) {
	t.Helper()
	p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("still running 30s after %v", sig)
	}
}

// TestRestartKeepsRunningResponses: responses already flowing survive
// tokenlb being killed or stopped, with either deploy config: tokenlb ends
// its routing stream once the observer follows the response, so Envoy
// carries the response on without it (envoy-override-host.yaml, whose
// failure_mode_allow is true, would keep them anyway). With envoy.yaml,
// only the requests that arrive while no tokenlb is up fail.
func TestRestartKeepsRunningResponses(t *testing.T) {
	for _, config := range []string{"envoy.yaml", "envoy-override-host.yaml"} {
		for _, sig := range []syscall.Signal{syscall.SIGKILL, syscall.SIGTERM} {
			t.Run(fmt.Sprintf("%s/%v", config, sig), func(t *testing.T) {
				s := startStack(t, envoyOpts{config: config, tokenlb: []string{"--shutdown-delay=0s", "--drain-timeout=20s"}})
				var streams []*liveStream
				for i := range 6 {
					streams = append(streams, s.startStream(t, fmt.Sprintf("running-%d", i)))
				}
				s.tokenlb.proc.signal(t, sig)
				for _, l := range streams {
					if err := l.finish(); err != nil {
						t.Error(err)
					}
				}
				if t.Failed() {
					return
				}
				resp, err := s.send(context.Background(), chatBody(10, false), "", nil)
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				if want := map[string]int{"envoy.yaml": 503, "envoy-override-host.yaml": 200}[config]; resp.StatusCode != want {
					t.Fatalf("a request with tokenlb down: %d, want %d", resp.StatusCode, want)
				}
				s.tokenlb.start()
				waitFor(t, 20*time.Second, "routing through tokenlb again", func() bool {
					resp, err := s.send(context.Background(), chatBody(10, false), "", nil)
					if err != nil {
						return false
					}
					defer resp.Body.Close()
					var rec received
					return resp.StatusCode == 200 && json.NewDecoder(resp.Body).Decode(&rec) == nil && rec.Header != ""
				})
			})
		}
	}
}

// TestRollingRestart: two tokenlb replicas behind Envoy's health-checked
// tokenlb cluster, restarted one at a time (SIGTERM: not ready for
// shutdown_delay, then drained), under a steady mix of short and streamed
// requests, and with streamed responses running across both restarts: not
// one request fails, with either deploy config.
func TestRollingRestart(t *testing.T) {
	for _, config := range []string{"envoy.yaml", "envoy-override-host.yaml"} {
		t.Run(config, func(t *testing.T) {
			var addrs []string
			s := &stack{byAddr: map[string]*backend{}}
			for range 3 {
				b := startBackend(t)
				s.backends = append(s.backends, b)
				s.byAddr[b.addr] = b
				addrs = append(addrs, b.addr)
			}
			// shutdown_delay covers Envoy's health check (deploy/*.yaml):
			// unhealthy after 2 failed checks 2 s apart, the first up to an
			// interval away, each taking up to its 1 s timeout.
			flags := []string{"--shutdown-delay=7s", "--drain-timeout=20s"}
			replicas := []*tokenlb{startTokenlb(t, addrs, flags...), startTokenlb(t, addrs, flags...)}
			s.tokenlb = replicas[0]
			s.envoy = startEnvoy(t, envoyOpts{config: config, Options: envoycfg.Options{
				TokenlbPort: replicas[0].grpcPort, MoreTokenlbPorts: []int{replicas[1].grpcPort}, Backends: addrs}})
			for _, r := range replicas {
				waitFor(t, 20*time.Second, "both replicas healthy in Envoy", func() bool { return s.envoy.tokenlbHealthy(t, r.grpcPort) })
			}

			var streams []*liveStream
			for i := range 4 {
				streams = append(streams, s.startStream(t, fmt.Sprintf("across-%d", i)))
			}
			load := s.steadyLoad(t, 40)
			for _, r := range replicas {
				r.proc.signal(t, syscall.SIGTERM)
				r.start()
				waitFor(t, 20*time.Second, "the restarted replica healthy in Envoy", func() bool { return s.envoy.tokenlbHealthy(t, r.grpcPort) })
			}
			sent, failures := load()
			for _, l := range streams {
				if err := l.finish(); err != nil {
					t.Error(err)
				}
			}
			if sent < 100 || len(failures) > 0 {
				t.Fatalf("%d requests during the roll, %d failed: %v", sent, len(failures), failures[:min(len(failures), 5)])
			}
			t.Logf("%d requests during the roll, none failed", sent)
		})
	}
}

// steadyLoad sends perSecond requests a second, alternately short and
// streamed, until the returned function is called; that returns how many
// were sent and why any failed.
func (s *stack) steadyLoad(t *testing.T, perSecond int) (stop func() (sent int, failures []string)) {
	var (
		mu       sync.Mutex
		failures []string
		sent     int
	)
	fail := func(i int, why string) {
		mu.Lock()
		failures = append(failures, fmt.Sprintf("request %d: %s", i, why))
		mu.Unlock()
	}
	wait := paced(perSecond, func(i int) {
		mu.Lock()
		sent++
		mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		stream := i%2 == 1
		resp, err := s.send(ctx, chatBody(10+i%7*100, stream), "", nil)
		if err != nil {
			fail(i, err.Error())
			return
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		var rec received
		switch {
		case err != nil:
			fail(i, "cut: "+err.Error())
		case resp.StatusCode != 200:
			fail(i, fmt.Sprintf("status %d: %s", resp.StatusCode, b))
		case stream && !strings.HasSuffix(string(b), "data: [DONE]\n\n"):
			fail(i, fmt.Sprintf("stream ended early: %q", b))
		case !stream && (json.Unmarshal(b, &rec) != nil || rec.Header == ""):
			// envoy-override-host.yaml serves without tokenlb: that
			// would hide a replica that failed.
			fail(i, fmt.Sprintf("not routed by tokenlb: %s", b))
		}
	})
	return func() (int, []string) {
		wait()
		return sent, failures
	}
}

// paced runs send(i) for i = 0, 1, 2, ... perSecond times a second, each in
// its own goroutine, until the returned function is called; that waits for
// every one to return.
func paced(perSecond int, send func(i int)) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	tick := time.NewTicker(time.Second / time.Duration(perSecond))
	wg.Go(func() {
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			wg.Go(func() { send(i) })
		}
	})
	return func() {
		cancel()
		wg.Wait()
	}
}

// tokenlbHealthy reports whether Envoy's active health check finds the
// tokenlb replica on port healthy.
func (e *envoy) tokenlbHealthy(t testing.TB, port int) bool {
	t.Helper()
	return strings.Contains(e.clusters(t), fmt.Sprintf("tokenlb::127.0.0.1:%d::health_flags::healthy\n", port))
}
