package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tokenlb/tokenlb/internal/envoycfg"
)

var soakFor = flag.Duration("soak", 8*time.Second, "how long TestSoak's load runs in all (make soak runs it for minutes)")

// TestSoak runs a bounded mixed load through real Envoy (envoy.yaml) and
// tokenlb: short and long prompts, streamed and not, clients that abort
// mid-stream, bad inputs, and clients that stall in their headers (cut by
// Envoy's timeouts, shortened to 1 s). In the first half tokenlb is
// restarted (SIGTERM); in the second, on the new tokenlb, a backend is
// killed and started again. It fails on any unexpected failure (anything
// but a 503 while no tokenlb is up, or a 5xx or cut while the backend is
// down), on a ledger that does not balance (picks against releases, every
// host back to 0, the sweeper reclaiming anything) and on growth of the
// new tokenlb's goroutines, open files or memory between the idle moments
// before and after the second half.
func TestSoak(t *testing.T) {
	s := startStack(t, envoyOpts{config: "envoy.yaml", tokenlb: []string{"--shutdown-delay=0s", "--health-check-interval=500ms"},
		Options: envoycfg.Options{Timeout: time.Second}})
	half := *soakFor / 2
	var w windows
	tally := newTally()
	// The sleeps below pace the scenario while the load runs; they
	// synchronise nothing.

	// First half: tokenlb restarted under load.
	load := s.soakLoad(tally, &w)
	time.Sleep(half / 2)
	end := w.open(tokenlbDown)
	s.tokenlb.proc.signal(t, syscall.SIGTERM)
	s.tokenlb.start()
	end()
	time.Sleep(half / 2)
	load()
	s.tokenlb.waitIdle()
	before := s.tokenlb.vitals()

	// Second half, on the new tokenlb: a backend killed and back.
	load = s.soakLoad(tally, &w)
	time.Sleep(half / 4)
	victim := s.backends[0]
	end = w.open(backendDown)
	victim.stop()
	waitFor(t, 20*time.Second, "the killed backend marked down", func() bool { return s.tokenlb.host(victim.addr).Health.Down })
	time.Sleep(half / 4)
	victim.restart(t)
	waitFor(t, 20*time.Second, "the restarted backend readmitted", func() bool { return !s.tokenlb.host(victim.addr).Health.Down })
	end()
	time.Sleep(half / 2)
	load()
	s.tokenlb.waitIdle()
	var after vitals
	waitFor(t, 20*time.Second, "tokenlb's goroutines back to where they were", func() bool {
		after = s.tokenlb.vitals()
		return after.goroutines <= before.goroutines+5
	})

	t.Logf("requests: %s", tally)
	t.Logf("the new tokenlb, idle before and after the second half: picks %d → %d, releases %d → %d, swept tokens %d",
		before.picks, after.picks, before.releases, after.releases, after.swept)
	t.Logf("goroutines %d → %d, open fds %d → %d, RSS %.1f → %.1f MiB", before.goroutines, after.goroutines,
		before.fds, after.fds, float64(before.rss)/(1<<20), float64(after.rss)/(1<<20))
	for _, f := range tally.unexpected {
		t.Errorf("unexpected: %s", f)
	}
	for _, kind := range []string{"ok", "aborted by the client", "refused as expected", "slow client cut (408)"} {
		if tally.count(kind) == 0 {
			t.Errorf("no request ended %q: %s", kind, tally)
		}
	}
	if after.picks <= before.picks || after.picks != after.releases || after.swept != 0 {
		t.Errorf("ledger: %d picks, %d releases, %d tokens swept", after.picks, after.releases, after.swept)
	}
	if after.fds > before.fds+5 || after.rss > before.rss*3/2+16<<20 {
		t.Errorf("tokenlb grew: fds %d → %d, RSS %d → %d", before.fds, after.fds, before.rss, after.rss)
	}
}

// The disruptions TestSoak causes.
const (
	tokenlbDown = "tokenlb restarting"
	backendDown = "a backend down"
)

// windows are the disruptions the scenario causes: requests that overlap
// one may fail.
type windows struct {
	mu   sync.Mutex
	list []window
}

type window struct {
	what       string
	start, end time.Time // end zero while open
}

// open starts a disruption; the returned function ends it.
func (w *windows) open(what string) (end func()) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.list = append(w.list, window{what: what, start: time.Now()})
	i := len(w.list) - 1
	return func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		w.list[i].end = time.Now()
	}
}

// excuse names the disruption that explains a request's failure, or "": a
// 503 for a request that overlapped tokenlb's restart (with envoy.yaml no
// request is routed while no tokenlb is up, and Envoy's own replies, a 408
// included, pass through tokenlb's filter too), or a 5xx or a cut response
// for one that overlapped a backend's downtime (it may have gone to that
// backend). A response cut by tokenlb's restart is never excused.
func (w *windows) excuse(start, end time.Time, err error) string {
	var f *soakFailure
	if !errors.As(err, &f) {
		return ""
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, x := range w.list {
		stop := x.end
		if stop.IsZero() {
			stop = end
		}
		switch {
		case x.what == tokenlbDown && f.status == http.StatusServiceUnavailable && !f.cut && !start.After(stop) && !end.Before(x.start):
			return x.what
		case x.what == backendDown && (f.status >= 500 || f.cut) && !start.After(stop) && !end.Before(x.start):
			return x.what
		}
	}
	return ""
}

// soakFailure is how a request of the mix failed.
type soakFailure struct {
	status int  // the HTTP status, if one came
	cut    bool // the response was cut
	msg    string
}

func (f *soakFailure) Error() string { return f.msg }

func failed(status int, cut bool, format string, args ...any) error {
	return &soakFailure{status: status, cut: cut, msg: fmt.Sprintf(format, args...)}
}

// tally counts outcomes by cause and keeps the unexpected ones.
type tally struct {
	mu         sync.Mutex
	by         map[string]int
	unexpected []string
}

func newTally() *tally { return &tally{by: map[string]int{}} }

func (t *tally) add(cause string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.by[cause]++
}

func (t *tally) fail(what string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.by["failed unexpectedly"]++
	t.unexpected = append(t.unexpected, what)
}

func (t *tally) count(cause string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.by[cause]
}

func (t *tally) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	sent := 0
	var causes []string
	for c, n := range t.by {
		sent += n
		causes = append(causes, fmt.Sprintf("%s %d", c, n))
	}
	slices.Sort(causes)
	return fmt.Sprintf("sent %d: %s", sent, strings.Join(causes, ", "))
}

// soakLoad sends about 60 requests a second of TestSoak's mix until the
// returned function is called, which waits for every one to finish.
func (s *stack) soakLoad(tl *tally, w *windows) (stop func()) {
	return paced(60, func(i int) {
		start := time.Now()
		cause, err := s.soakRequest(i)
		if err == nil {
			tl.add(cause)
			return
		}
		if d := w.excuse(start, time.Now(), err); d != "" {
			tl.add("failed while " + d)
			return
		}
		tl.fail(fmt.Sprintf("request %d (%s) at %s: %v", i, cause, start.Format("15:04:05.000"), err))
	})
}

// soakRequest sends request i of the mix. It returns the outcome's cause,
// or an error and what kind of request failed.
func (s *stack) soakRequest(i int) (cause string, err error) {
	switch i % 10 {
	case 7, 8: // bad input
		body := []byte(`{"model":"m","messages":[{"role":"user","content":"unterminated`)
		want := "invalid_json"
		if i%10 == 8 {
			body, want = []byte(`{"model":"m"}`), "missing_prompt"
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		resp, err := s.send(ctx, body, "", nil)
		if err != nil {
			return "bad input", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 400 || !bytes.Contains(b, []byte(want)) {
			return "bad input", failed(resp.StatusCode, false, "status %d: %s", resp.StatusCode, b)
		}
		return "refused as expected", nil
	case 9: // a client that stalls in its headers
		if i%20 != 9 {
			break
		}
		conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", s.envoy.port))
		if err != nil {
			return "slow client", err
		}
		defer conn.Close()
		io.WriteString(conn, "POST /v1/chat/completions HTTP/1.1\r\nHost: llm\r\n")
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			return "slow client", err
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestTimeout {
			return "slow client", failed(resp.StatusCode, false, "status %d, want 408: %s", resp.StatusCode, b)
		}
		return "slow client cut (408)", nil
	case 6: // aborted after the first event
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		resp, err := s.send(ctx, chatBody(200, true), "", map[string]string{"x-e2e-pace": "200ms"})
		if err != nil {
			return "normal", err
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 {
			b, _ := io.ReadAll(resp.Body)
			return "normal", failed(resp.StatusCode, false, "status %d: %s", resp.StatusCode, b)
		}
		bufio.NewReader(resp.Body).ReadString('\n')
		cancel()
		return "aborted by the client", nil
	}
	words, stream := 10+i%5*50, i%2 == 1
	if i%10 == 4 {
		words = 3000
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := s.send(ctx, chatBody(words, stream), "", nil)
	if err != nil {
		return "normal", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	switch {
	case err != nil:
		return "normal", failed(resp.StatusCode, true, "cut: %v", err)
	case resp.StatusCode != 200:
		return "normal", failed(resp.StatusCode, false, "status %d: %s", resp.StatusCode, b)
	case stream && !bytes.HasSuffix(b, []byte("data: [DONE]\n\n")):
		return "normal", failed(resp.StatusCode, true, "stream ended early: %q", b)
	}
	return "ok", nil
}

// vitals are what TestSoak watches of tokenlb.
type vitals struct {
	goroutines, fds, rss   int64
	picks, releases, swept int64
}

func (tl *tokenlb) vitals() vitals {
	tl.t.Helper()
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", tl.adminPort))
	if err != nil {
		tl.t.Fatal(err)
	}
	defer resp.Body.Close()
	var v vitals
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		name, value, ok := strings.Cut(line, " ")
		if !ok || strings.HasPrefix(line, "#") {
			continue
		}
		name, _, _ = strings.Cut(name, "{")
		f, _ := strconv.ParseFloat(value, 64)
		switch name {
		case "go_goroutines":
			v.goroutines = int64(f)
		case "process_open_fds":
			v.fds = int64(f)
		case "process_resident_memory_bytes":
			v.rss = int64(f)
		case "tokenlb_host_picks_total":
			v.picks += int64(f)
		case "tokenlb_releases_total":
			v.releases += int64(f)
		case "tokenlb_sweeper_reclaimed_tokens_total":
			v.swept += int64(f)
		}
	}
	return v
}
