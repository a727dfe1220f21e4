package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.yaml.in/yaml/v3"

	"github.com/tokenlb/tokenlb/internal/envoycfg"
	"github.com/tokenlb/tokenlb/internal/proc"
	"github.com/tokenlb/tokenlb/internal/sim"
	"github.com/tokenlb/tokenlb/internal/testdns"
)

// The churn run (--churn): under an open loop at o.Utilization of
// o.Backends backends' estimated capacity, the fleet changes through
// tokenlb's dns discovery, a DNS server on loopback whose answer the script
// changes (internal/testdns), each backend on an address of its own
// (127.0.0.2, 127.0.0.3, … with one port: A records carry no port):
//
//  1. scale-up: a new backend started, then put in the DNS ("ready");
//  2. scale-down: backend-1 taken out of the DNS ("not ready"), its server
//     stopped once tokenlb shows it removed with nothing in flight
//     ("drained", then "gone");
//  3. rolling restart: backend-2 removed so, then a new process on a new
//     address put in the DNS;
//  4. kill: backend-3's server closed at once, connections cut, while it is
//     still in the DNS; taken out of the DNS churnKillDNSDelay later (as a
//     kubelet would once it saw the container die); then a replacement put
//     in.
//
// Envoy runs deploy/envoy.yaml as the tokenlb arms do, with an access log
// added (which host each request went to, and how it ended); each backend
// notes every request it receives; a poller reads tokenlb's /debug/hosts
// every churnPoll to see when tokenlb shows each change.
const (
	churnProfile = "seed"
	// churnDNSInterval is tokenlb's discovery.dns.interval.
	churnDNSInterval = time.Second
	churnPoll        = 25 * time.Millisecond
	churnWarmup      = 5 * time.Second
	churnSettle      = 6 * time.Second
	// churnKillDNSDelay is how long a killed backend stays in the DNS.
	churnKillDNSDelay = 3 * time.Second
	churnTail         = 4 * time.Second
	// How long the script waits for tokenlb to show a change, and for a
	// removed host's requests to end, before it goes on regardless (the
	// report then shows the change as never seen or drained).
	churnSeenTimeout  = 15 * time.Second
	churnDrainTimeout = 60 * time.Second
	// churnIDHeader carries each request's number, to find it in the
	// backends' notes and Envoy's access log.
	churnIDHeader = "x-bench-id"
	// churnShareWindow is how long after tokenlb shows a new host its share
	// of the requests is counted.
	churnShareWindow = 5 * time.Second
)

// Failure causes of a churn run's failed requests.
const (
	// CauseInFlightKilled: routed to the killed backend before it died.
	CauseInFlightKilled = "in_flight_on_killed_host"
	// CauseKilledBeforeRemoval: routed to the killed backend after it died
	// and before tokenlb showed it removed (what it took tokenlb's passive
	// ejection or health checks to stop picking it).
	CauseKilledBeforeRemoval = "sent_to_killed_host_before_removal"
	// CauseRemovedAfterChange: routed to a host after tokenlb showed it
	// removed.
	CauseRemovedAfterChange = "routed_to_removed_host_after_change"
	// CauseOther: anything else (no host known, a host not being removed).
	CauseOther = "other"
)

// ChurnCauses lists the causes in the order reports show them.
var ChurnCauses = []string{CauseInFlightKilled, CauseKilledBeforeRemoval, CauseRemovedAfterChange, CauseOther}

// ChurnReport is what the churn runs of every seed measured.
type ChurnReport struct {
	Mode    string       `json:"mode"`
	Seeds   []uint64     `json:"seeds"`
	Runs    []ChurnRun   `json:"runs"`
	Summary []ChurnStat  `json:"summary"`
	Targets []ChurnCheck `json:"targets"`
}

// ChurnRun is one seed's churn run.
type ChurnRun struct {
	Seed     uint64  `json:"seed"`
	RateRPS  float64 `json:"rate_rps"`
	Requests int     `json:"requests"`
	Errors   int     `json:"errors"`
	// Failures counts the failed requests by cause (ChurnCauses), and
	// FailureSamples shows a few of those whose cause is "other".
	Failures       map[string]int `json:"failures"`
	FailureSamples []string       `json:"failure_samples,omitempty"`
	// FailedRequests lists every failed request (the first 100).
	FailedRequests []ChurnFailure `json:"failed_requests,omitempty"`
	Events         []ChurnEvent   `json:"events"`
	// Ejections are the times (ms since the load began) tokenlb first
	// showed each host down, whatever the host.
	Ejections []ChurnEjection `json:"ejections,omitempty"`
	// HostsAtZero says every host tokenlb listed showed no request, token or
	// load in flight once the last response had ended, ZeroAfterMs after it;
	// FinalHosts is that listing.
	HostsAtZero bool        `json:"hosts_at_zero"`
	ZeroAfterMs float64     `json:"zero_after_ms"`
	FinalHosts  []churnHost `json:"final_hosts"`
	// SweptTokens is tokenlb_sweeper_reclaimed_tokens_total at the end.
	SweptTokens float64 `json:"swept_tokens"`
	TTFT        Stats   `json:"ttft_ms"`
	E2E         Stats   `json:"e2e_ms"`
}

// ChurnEvent is one change of the fleet and what followed. Times are ms
// since the load began; a time that never came is left out.
type ChurnEvent struct {
	// Kind is add, remove (graceful) or kill; Why says which step of the
	// script: scale-up, scale-down, rolling restart, kill, replacement.
	Kind    string `json:"kind"`
	Why     string `json:"why"`
	Backend string `json:"backend"`
	Address string `json:"address"`
	// KillMs: the backend's server closed (kill). ReleasedMs: tokenlb's
	// /debug/hosts first showed nothing in flight on the killed host. DNSMs:
	// the DNS answer changed. SeenMs: tokenlb applied the change (its log
	// line "hosts changed", to the millisecond; else ShownMs). ShownMs:
	// /debug/hosts first showed it (the host listed and not removed; or
	// removed, or gone). EjectedMs: tokenlb ejected the killed host (its log
	// line "host ejected"; else when /debug/hosts first showed it down).
	// DrainedMs: /debug/hosts first showed the removed host with nothing in
	// flight (or no longer listed it). GoneMs: the server was stopped.
	KillMs     *float64 `json:"kill_ms,omitempty"`
	ReleasedMs *float64 `json:"released_ms,omitempty"`
	DNSMs      *float64 `json:"dns_change_ms,omitempty"`
	SeenMs     *float64 `json:"seen_ms,omitempty"`
	ShownMs    *float64 `json:"shown_ms,omitempty"`
	EjectedMs  *float64 `json:"ejected_ms,omitempty"`
	DrainedMs  *float64 `json:"drained_ms,omitempty"`
	GoneMs     *float64 `json:"gone_ms,omitempty"`
	// Measures are the event's durations and counts (see measure).
	Measures map[string]float64 `json:"measures"`
	// Failures count the failed requests routed to this host, by cause.
	Failures map[string]int `json:"failures,omitempty"`
	// AfterSeen lists, for a removal or kill, the requests routed to the
	// host at or after SeenMs (the first 20).
	AfterSeen []ChurnPick `json:"after_seen,omitempty"`

	kill, released, dns, seen, shown, ejected, drained, gone time.Time
}

// ChurnFailure is a failed request of a churn run: when it was sent and
// routed (ms since the load began; routed is when a backend received it, or
// else when it was sent), the host Envoy sent it to, its cause, and how
// Envoy's access log says it ended.
type ChurnFailure struct {
	ID       string  `json:"id"`
	SentMs   float64 `json:"sent_ms"`
	RoutedMs float64 `json:"routed_ms"`
	Host     string  `json:"host"`
	Cause    string  `json:"cause"`
	Status   string  `json:"status,omitempty"`
	Flags    string  `json:"flags,omitempty"`
	Details  string  `json:"details,omitempty"`
	Err      string  `json:"error"`
}

// ChurnPick is a request routed to a host: when it was sent and when it
// reached the host (ms since the load began; zero if it never did).
type ChurnPick struct {
	ID        string  `json:"id"`
	SentMs    float64 `json:"sent_ms"`
	ArrivedMs float64 `json:"arrived_ms,omitempty"`
	Failed    bool    `json:"failed,omitempty"`
}

// ChurnEjection is a host tokenlb showed down.
type ChurnEjection struct {
	Address string  `json:"address"`
	AtMs    float64 `json:"at_ms"`
	Reason  string  `json:"reason"`
}

// ChurnStat summarises one measure of one kind of event over every event
// of every seed.
type ChurnStat struct {
	Kind    string  `json:"kind"`
	Measure string  `json:"measure"`
	Events  int     `json:"events"`
	Median  float64 `json:"median"`
	Max     float64 `json:"max"`
}

// ChurnCheck is one of the targets and whether the runs met it.
type ChurnCheck struct {
	Target   string `json:"target"`
	Measured string `json:"measured"`
	Met      bool   `json:"met"`
}

// The measures of each kind of event, in the order tables show them.
var churnMeasures = map[string][]string{
	"add":    {"dns_to_seen_ms", "seen_to_shown_ms", "seen_to_first_request_ms", "dns_to_first_request_ms", "share_next_5s"},
	"remove": {"dns_to_seen_ms", "seen_to_shown_ms", "seen_to_last_pick_ms", "picks_after_seen", "seen_to_drained_ms", "drained_to_gone_ms", "failed"},
	"kill":   {"kill_to_released_ms", "kill_to_ejected_ms", "picks_after_kill", "kill_to_dns_ms", "dns_to_seen_ms", "seen_to_last_pick_ms", "picks_after_seen", "failed"},
}

// runChurn runs the churn measurement once per seed of c.Seeds and writes
// churn.json and churn.md to c.OutDir.
func (c *Command) runChurn(ctx context.Context, o Options, w io.Writer) error {
	if o.Backend.Kind != "llmsim" {
		return errors.New("bench: --churn runs llmsim backends only")
	}
	if o.Backends < 3 {
		return errors.New("bench: --churn needs at least 3 backends (it removes backend-1 and backend-2 and kills backend-3)")
	}
	if o.Concurrency > 0 || o.Replicas > 1 || o.Direct > 0 || o.KillAt > 0 {
		return errors.New("bench: --churn is an open loop of its own: no --concurrency, --replicas, --direct or --kill-at")
	}
	rep := &ChurnReport{Mode: fmt.Sprintf("%s profile, open loop at %.0f%% of %d backends' estimated capacity, time scale %g, "+
		"tokenlb dns discovery every %s, /debug/hosts read every %s",
		churnProfile, 100*o.Utilization, o.Backends, o.TimeScale, churnDNSInterval, churnPoll)}
	for _, s := range strings.Split(c.Seeds, ",") {
		seed, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return fmt.Errorf("seed %q: %w", s, err)
		}
		o.Seed = seed
		start := time.Now()
		run, err := Churn(ctx, o)
		if err != nil {
			return fmt.Errorf("churn seed %d: %w", seed, err)
		}
		fmt.Fprintf(o.Log, "churn   seed %d: %d requests, %d failed %v, hosts at 0: %v, swept %g (%s)\n", seed, run.Requests, run.Errors,
			run.Failures, run.HostsAtZero, run.SweptTokens, time.Since(start).Round(time.Second))
		rep.Seeds = append(rep.Seeds, seed)
		rep.Runs = append(rep.Runs, run)
	}
	rep.Summarize()
	if err := rep.Write(c.OutDir); err != nil {
		return err
	}
	fmt.Fprintln(w, rep.Table())
	return nil
}

// Write stores churn.json and churn.md in dir.
func (r *ChurnReport) Write(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "churn.json"), js, 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "churn.md"), []byte(r.Table()), 0o644)
}

// churnBackend is one llmsim instance of a churn run.
type churnBackend struct {
	name, addr string
	srv        *http.Server
	stopSim    context.CancelFunc
}

// churnArrival is a request as a backend received it.
type churnArrival struct {
	addr string
	at   time.Time
}

// churnRun is one churn run in progress.
type churnRun struct {
	o        Options
	g        *proc.Group
	zone     *testdns.Zone
	port     int
	started  int                      // backends started so far
	backends map[string]*churnBackend // by name
	live     []string                 // the addresses in the DNS answer
	poller   *hostPoller
	events   []*ChurnEvent

	// Set by setUp: tokenlb's admin URL, the URL the load is sent to
	// (Envoy's chat completions endpoint), and Envoy's access log.
	admin, url, accessLog string

	mu       sync.Mutex
	arrivals map[string]churnArrival // by request id
}

// churnTraffic is the load of a churn run: its rate, when it began, each
// request as the client saw it, and when the last successful response
// ended (the start if none did).
type churnTraffic struct {
	rate    float64
	start   time.Time
	samples []churnSample
	lastEnd time.Time
}

// Churn runs the churn script once, with o.Seed, and measures it: it sets
// up the fleet, tokenlb and Envoy, drives the load while the script
// changes the fleet, checks the end state, then merges what the client,
// the backends, Envoy and tokenlb saw into the measures.
func Churn(ctx context.Context, o Options) (ChurnRun, error) {
	dir, done, err := runDir(o.LogDir, "churn")
	if err != nil {
		return ChurnRun{}, err
	}
	defer done()
	r := &churnRun{o: o, g: &proc.Group{Dir: dir}, zone: &testdns.Zone{}, backends: map[string]*churnBackend{}, arrivals: map[string]churnArrival{}}
	defer r.g.StopAll()
	defer r.stopBackends()
	simCtx, stopSims := context.WithCancel(ctx)
	defer stopSims()
	stopDNS, err := r.setUp(ctx, simCtx)
	if err != nil {
		return ChurnRun{}, err
	}
	defer stopDNS()
	pollCtx, stopPolling := context.WithCancel(ctx)
	defer stopPolling()
	if err := r.watchHosts(ctx, pollCtx); err != nil {
		return ChurnRun{}, err
	}

	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1024}}
	defer client.CloseIdleConnections()
	traffic, err := r.drive(ctx, simCtx, client)
	if err != nil {
		return ChurnRun{}, err
	}
	end := r.endState(ctx, traffic.lastEnd)
	stopPolling()
	return r.measure(ctx, traffic, end)
}

// setUp starts the first o.Backends backends, the DNS server that answers
// their addresses, tokenlb following it, and Envoy in front of tokenlb. It
// returns the function that stops the DNS server; the rest stop with r's
// process group and backends.
func (r *churnRun) setUp(ctx, simCtx context.Context) (stopDNS func(), err error) {
	// Room for the first backends and the three the script adds.
	if r.port, err = churnPort(r.o.Backends + 3); err != nil {
		return nil, err
	}
	for range r.o.Backends {
		b, err := r.startBackend(simCtx)
		if err != nil {
			return nil, err
		}
		r.live = append(r.live, b.addr)
	}
	r.setDNS()
	dnsAddr, stop, err := r.zone.Start()
	if err != nil {
		return nil, err
	}
	grpcPort, adminPort, err := r.startTokenlb(ctx, dnsAddr)
	if err == nil {
		r.admin = fmt.Sprintf("http://127.0.0.1:%d", adminPort)
		r.accessLog = filepath.Join(r.g.Dir, "access.log")
		r.url, err = startChurnEnvoy(ctx, r.g, r.o, grpcPort, r.accessLog)
	}
	if err != nil {
		stop()
		return nil, err
	}
	return stop, nil
}

// watchHosts starts reading tokenlb's /debug/hosts, until pollCtx ends, and
// waits for it to list the first backends: the script's changes are timed
// from a fleet tokenlb already knows.
func (r *churnRun) watchHosts(ctx, pollCtx context.Context) error {
	r.poller = newHostPoller(r.admin + "/debug/hosts")
	go r.poller.run(pollCtx)
	if _, ok := r.poller.wait(ctx, churnSeenTimeout, func(s hostSnapshot) bool { return len(s.hosts) == r.o.Backends }); !ok {
		return errors.New("tokenlb's /debug/hosts does not list the first backends")
	}
	return nil
}

// drive sends the open loop through Envoy while the script changes the
// fleet, then for churnTail more, and waits for every response. An error
// of the script, or a process of r's group that exited, fails the run.
func (r *churnRun) drive(ctx, simCtx context.Context, client *http.Client) (churnTraffic, error) {
	reqs, rate, err := churnRequests(r.o)
	if err != nil {
		return churnTraffic{}, err
	}
	stop := make(chan struct{})
	t := churnTraffic{rate: rate, start: time.Now()}
	loaded := make(chan struct{})
	go func() {
		t.samples = churnLoad(ctx, client, r.url, reqs, rate, r.o.Seed, stop)
		close(loaded)
	}()
	scriptErr := r.script(ctx, simCtx)
	if scriptErr == nil {
		sleep(ctx, churnTail)
	}
	close(stop)
	<-loaded
	t.lastEnd = lastResponse(t.start, t.samples)
	if scriptErr != nil {
		return t, scriptErr
	}
	return t, r.g.Exited()
}

// churnRequests returns the requests of a run and their rate: the rate
// that loads o.Backends backends at o.Utilization, and enough requests for
// the whole script at that rate, with room.
func churnRequests(o Options) ([]Request, float64, error) {
	reqs, err := Generate(churnProfile, o.Seed, 400)
	if err != nil {
		return nil, 0, err
	}
	rate := Rate(reqs, float64(o.Backends), o.Utilization, o.TimeScale)
	if reqs, err = Generate(churnProfile, o.Seed, int(rate*150)+100); err != nil {
		return nil, 0, err
	}
	return reqs, rate, nil
}

// lastResponse returns when the last successful response of samples ended,
// or start if none did.
func lastResponse(start time.Time, samples []churnSample) time.Time {
	last := start
	for _, s := range samples {
		if end := s.start.Add(s.e2e); s.err == nil && end.After(last) {
			last = end
		}
	}
	return last
}

// endState checks that churn leaked nothing: it waits (15 s at most) for
// tokenlb to show every host with nothing in flight, the time after
// lastEnd that took, and reads what tokenlb's sweeper reclaimed. It sets
// only those fields of the result.
func (r *churnRun) endState(ctx context.Context, lastEnd time.Time) ChurnRun {
	var out ChurnRun
	zeroAt, zero := r.poller.wait(ctx, 15*time.Second, func(s hostSnapshot) bool { return s.idle() })
	out.HostsAtZero = zero
	if zero {
		out.ZeroAfterMs = max(0, ms(zeroAt.Sub(lastEnd)))
	}
	out.FinalHosts = r.poller.last().hosts
	out.SweptTokens = scrapeCounter(r.admin+"/metrics", "tokenlb_sweeper_reclaimed_tokens_total")
	return out
}

// measure merges the load's requests with the backends' notes and Envoy's
// access log, times the events from tokenlb's log, and analyses them
// (AnalyzeChurn); the result carries end's end state too.
func (r *churnRun) measure(ctx context.Context, t churnTraffic, end ChurnRun) (ChurnRun, error) {
	access, err := readAccessLog(ctx, r.accessLog, len(t.samples))
	if err != nil {
		return end, err
	}
	reqs := r.mergeRequests(t.samples, access)
	events := r.timedEvents(readTokenlbLog(r.g.Dir))
	run := AnalyzeChurn(t.start, events, reqs)
	run.FinalHosts, run.HostsAtZero, run.ZeroAfterMs, run.SweptTokens = end.FinalHosts, end.HostsAtZero, end.ZeroAfterMs, end.SweptTokens
	run.Seed, run.RateRPS = r.o.Seed, t.rate
	for _, d := range r.poller.ejections() {
		run.Ejections = append(run.Ejections, ChurnEjection{Address: d.addr, AtMs: ms(d.at.Sub(t.start)), Reason: d.reason})
	}
	return run, ctx.Err()
}

// mergeRequests joins each request as the client saw it with the backend
// that received it and its line of the access log. The host is the
// upstream Envoy sent it to, else the backend that received it, else the
// destination tokenlb chose (for a request never tried).
func (r *churnRun) mergeRequests(samples []churnSample, access map[string]accessEntry) []churnRequest {
	r.mu.Lock()
	arrivals := r.arrivals
	r.mu.Unlock()
	var merged []churnRequest
	for _, s := range samples {
		q := churnRequest{ID: s.id, Start: s.start, Err: errText(s.err), TTFT: s.ttft, E2E: s.e2e}
		if a, ok := arrivals[s.id]; ok {
			q.Arrived, q.Host = a.at, a.addr
		}
		if e, ok := access[s.id]; ok {
			q.Code, q.Flags, q.Details = e.code, e.flags, e.details
			switch {
			case e.upstream != "" && e.upstream != "-":
				q.Host = e.upstream
			case q.Host == "" && e.destination != "" && e.destination != "-":
				q.Host = e.destination // chosen by tokenlb, never tried
			}
		}
		merged = append(merged, q)
	}
	return merged
}

// timedEvents returns the run's events with the times tokenlb's log gives,
// which are to the millisecond where /debug/hosts is only as fine as
// churnPoll: when tokenlb applied each change (else when /debug/hosts
// showed it), and when it ejected a killed host.
func (r *churnRun) timedEvents(tl tokenlbLog) []ChurnEvent {
	var events []ChurnEvent
	for _, e := range r.events {
		e.seen = e.shown
		if t := tl.seen(e.Kind, e.Address); !t.IsZero() {
			e.seen = t
		}
		if t := tl.ejected[e.Address]; e.Kind == "kill" && !t.IsZero() {
			e.ejected = t
		}
		events = append(events, *e)
	}
	return events
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// churnPort returns a port free on the loopback addresses of the first n
// backends (127.0.0.2 on).
func churnPort(n int) (int, error) {
	for range 50 {
		port, err := proc.FreePort()
		if err != nil {
			return 0, err
		}
		ok := true
		for i := range n {
			l, err := net.Listen("tcp", net.JoinHostPort(churnIP(i), strconv.Itoa(port)))
			if err != nil {
				ok = false
				break
			}
			l.Close()
		}
		if ok {
			return port, nil
		}
	}
	return 0, errors.New("bench: no port free on every backend's loopback address")
}

// churnIP is the loopback address of the i-th backend started (from 0).
func churnIP(i int) string { return fmt.Sprintf("127.0.0.%d", i+2) }

// startBackend starts the next llmsim backend on an address of its own.
func (r *churnRun) startBackend(simCtx context.Context) (*churnBackend, error) {
	i := r.started
	addr := net.JoinHostPort(churnIP(i), strconv.Itoa(r.port))
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("bench: backend on %s: %w", addr, err)
	}
	r.started++
	cfg := backendConfig(r.o, i)
	s := sim.New(cfg)
	ctx, stop := context.WithCancel(simCtx)
	go s.Run(ctx)
	b := &churnBackend{name: cfg.Name, addr: addr, stopSim: stop}
	b.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if id := req.Header.Get(churnIDHeader); id != "" {
			r.mu.Lock()
			r.arrivals[id] = churnArrival{addr, time.Now()}
			r.mu.Unlock()
		}
		s.ServeHTTP(w, req)
	})}
	go b.srv.Serve(l)
	r.backends[b.name] = b
	return b, nil
}

// stopBackends closes every backend still running.
func (r *churnRun) stopBackends() {
	for _, b := range r.backends {
		b.srv.Close()
		b.stopSim()
	}
}

// setDNS makes the DNS answer r.live's addresses.
func (r *churnRun) setDNS() {
	var ips []string
	for _, a := range r.live {
		host, _, _ := net.SplitHostPort(a)
		ips = append(ips, host)
	}
	r.zone.Set(ips...)
}

// churnName is the DNS name tokenlb follows.
const churnName = "llm.churn.test"

// startTokenlb starts tokenlb with dns discovery from the server at
// dnsAddr and returns its ext_proc and admin ports once it is ready. Its
// sweeper reclaims what is a minute old, every second (the shortest TTL it
// takes), so that a lease leaked early in the run would show in the
// sweeper's counter by the end.
func (r *churnRun) startTokenlb(ctx context.Context, dnsAddr string) (grpcPort, adminPort int, err error) {
	grpcPort, _ = proc.FreePort()
	adminPort, _ = proc.FreePort()
	args := append([]string{"--listen", fmt.Sprintf("127.0.0.1:%d", grpcPort), "--admin", fmt.Sprintf("127.0.0.1:%d", adminPort),
		"--discovery", "dns", "--dns-name", net.JoinHostPort(churnName, strconv.Itoa(r.port)),
		"--dns-interval", churnDNSInterval.String(), "--dns-server", dnsAddr,
		"--lease-ttl", "1m", "--sweep-interval", "1s", "--log-level", "info"}, r.o.TokenlbFlags...)
	if err := r.g.Start("tokenlb", r.o.Tokenlb, args...); err != nil {
		return 0, 0, err
	}
	if err := r.g.WaitReady(ctx, fmt.Sprintf("http://127.0.0.1:%d/readyz", adminPort)); err != nil {
		return 0, 0, err
	}
	return grpcPort, adminPort, nil
}

// startChurnEnvoy starts Envoy on deploy/envoy.yaml in front of tokenlb at
// tokenlbPort, as the tokenlb arms run it, plus an access log in JSON at
// accessLog, and returns the URL of its chat completions endpoint.
func startChurnEnvoy(ctx context.Context, g *proc.Group, o Options, tokenlbPort int, accessLog string) (string, error) {
	listen, err := proc.FreePort()
	if err != nil {
		return "", err
	}
	admin, err := proc.FreePort()
	if err != nil {
		return "", err
	}
	cfg, err := envoycfg.Render(filepath.Join(o.DeployDir, "envoy.yaml"),
		envoycfg.Options{ListenPort: listen, AdminPort: admin, TokenlbPort: tokenlbPort})
	if err != nil {
		return "", err
	}
	if cfg, err = withAccessLog(cfg, accessLog); err != nil {
		return "", err
	}
	path := filepath.Join(g.Dir, "envoy-churn.yaml")
	if err := os.WriteFile(path, cfg, 0o600); err != nil {
		return "", err
	}
	if err := g.Start("envoy", o.Envoy, "-c", path, "--disable-hot-restart", "--concurrency", "1", "-l", "error"); err != nil {
		return "", err
	}
	if err := g.WaitReady(ctx, fmt.Sprintf("http://127.0.0.1:%d/ready", admin)); err != nil {
		return "", err
	}
	return fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", listen), nil
}

// withAccessLog adds to an Envoy configuration's first listener a JSON
// access log at path: each request's id (churnIDHeader), the upstream host
// Envoy sent it to (or tried to), the destination tokenlb set, its status,
// response flags and code details. It changes nothing else.
func withAccessLog(cfg []byte, path string) (out []byte, err error) {
	var root map[string]any
	if err := yaml.Unmarshal(cfg, &root); err != nil {
		return nil, err
	}
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("bench: the Envoy configuration has an unexpected shape: %v", r)
		}
	}()
	listener := root["static_resources"].(map[string]any)["listeners"].([]any)[0].(map[string]any)
	chain := listener["filter_chains"].([]any)[0].(map[string]any)
	hcm := chain["filters"].([]any)[0].(map[string]any)["typed_config"].(map[string]any)
	logs, _ := hcm["access_log"].([]any)
	hcm["access_log"] = append(logs, map[string]any{
		"name": "envoy.access_loggers.file",
		"typed_config": map[string]any{
			"@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
			"path":  path,
			"log_format": map[string]any{"json_format": map[string]any{
				"id":          "%REQ(" + strings.ToUpper(churnIDHeader) + ")%",
				"upstream":    "%UPSTREAM_HOST%",
				"destination": "%REQ(X-GATEWAY-DESTINATION-ENDPOINT)%",
				"code":        "%RESPONSE_CODE%",
				"flags":       "%RESPONSE_FLAGS%",
				"details":     "%RESPONSE_CODE_DETAILS%",
			}},
		},
	})
	return yaml.Marshal(root)
}

// accessEntry is one line of the churn run's access log.
type accessEntry struct {
	upstream, destination, code, flags, details string
}

// readAccessLog reads the access log at path, waiting (Envoy writes it
// every second) until it holds want requests or 15 s pass, and returns
// its entries by request id.
func readAccessLog(ctx context.Context, path string, want int) (map[string]accessEntry, error) {
	deadline := time.Now().Add(15 * time.Second)
	for {
		entries, err := parseAccessLog(path)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
		if len(entries) >= want || time.Now().After(deadline) || ctx.Err() != nil {
			return entries, nil
		}
		sleep(ctx, 200*time.Millisecond)
	}
}

func parseAccessLog(path string) (map[string]accessEntry, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]accessEntry{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) != nil {
			continue
		}
		s := func(k string) string {
			if m[k] == nil {
				return ""
			}
			return fmt.Sprint(m[k])
		}
		if id := s("id"); id != "" && id != "-" {
			out[id] = accessEntry{upstream: s("upstream"), destination: s("destination"), code: s("code"), flags: s("flags"), details: s("details")}
		}
	}
	return out, sc.Err()
}

// script changes the fleet, step by step, while the load runs. Each wait
// between steps is longer by a random part of the DNS interval, so that the
// changes fall anywhere in tokenlb's resolution cycle (each step begins
// right after tokenlb applied the last change, and would otherwise fall at
// the same point of the cycle every time).
func (r *churnRun) script(ctx, simCtx context.Context) error {
	rng := rand.New(rand.NewPCG(r.o.Seed, 0xc4a2))
	jitter := func() time.Duration { return time.Duration(rng.Float64() * float64(churnDNSInterval)) }
	sleep(ctx, churnWarmup+jitter())
	step := func(f func() error) error {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err := f(); err != nil {
			return err
		}
		sleep(ctx, churnSettle+jitter())
		return nil
	}
	// A new pod comes up a while after the old one went: the wait is
	// random, for the same reason as above.
	addNew := func(why string) error {
		sleep(ctx, jitter())
		b, err := r.startBackend(simCtx)
		if err != nil {
			return err
		}
		r.add(ctx, b, why)
		return nil
	}
	steps := []func() error{
		func() error { return addNew("scale-up") },
		func() error { r.remove(ctx, r.backends["backend-1"], "scale-down"); return nil },
		func() error {
			r.remove(ctx, r.backends["backend-2"], "rolling restart")
			return addNew("rolling restart")
		},
		func() error {
			r.kill(ctx, r.backends["backend-3"])
			return addNew("replacement")
		},
	}
	for _, s := range steps {
		if err := step(s); err != nil {
			return err
		}
	}
	return ctx.Err()
}

// logEvent writes one line of progress for an event.
func (r *churnRun) logEvent(e *ChurnEvent) {
	d := func(a, b time.Time) string {
		if a.IsZero() || b.IsZero() {
			return "never"
		}
		return b.Sub(a).Round(time.Millisecond).String()
	}
	switch e.Kind {
	case "add":
		fmt.Fprintf(r.o.Log, "churn   %-15s %s %s: in the DNS, shown by tokenlb after %s\n", e.Why, e.Backend, e.Address, d(e.dns, e.shown))
	case "remove":
		fmt.Fprintf(r.o.Log, "churn   %-15s %s %s: out of the DNS, shown removed after %s, drained %s later, stopped %s later\n",
			e.Why, e.Backend, e.Address, d(e.dns, e.shown), d(e.shown, e.drained), d(e.drained, e.gone))
	case "kill":
		fmt.Fprintf(r.o.Log, "churn   %-15s %s %s: killed, nothing in flight after %s, shown down after %s, out of the DNS %s later, shown removed after %s\n",
			e.Why, e.Backend, e.Address, d(e.kill, e.released), d(e.kill, e.ejected), d(e.kill, e.dns), d(e.dns, e.shown))
	}
}

// add puts a started backend in the DNS and waits for tokenlb to show it.
func (r *churnRun) add(ctx context.Context, b *churnBackend, why string) {
	e := &ChurnEvent{Kind: "add", Why: why, Backend: b.name, Address: b.addr}
	r.live = append(r.live, b.addr)
	e.dns = time.Now()
	r.setDNS()
	e.shown, _ = r.poller.wait(ctx, churnSeenTimeout, func(s hostSnapshot) bool { return s.active(b.addr) })
	r.events = append(r.events, e)
	r.logEvent(e)
}

// takeOut takes addr out of the DNS, waits for tokenlb to show it removed,
// then for it to show nothing in flight there.
func (r *churnRun) takeOut(ctx context.Context, e *ChurnEvent) {
	r.live = slices.DeleteFunc(r.live, func(a string) bool { return a == e.Address })
	e.dns = time.Now()
	r.setDNS()
	e.shown, _ = r.poller.wait(ctx, churnSeenTimeout, func(s hostSnapshot) bool { return !s.active(e.Address) })
	e.drained, _ = r.poller.wait(ctx, churnDrainTimeout, func(s hostSnapshot) bool { return s.drained(e.Address) })
}

// remove takes a backend out gracefully: out of the DNS (not ready), then,
// once tokenlb shows it drained, its server shut down (gone).
func (r *churnRun) remove(ctx context.Context, b *churnBackend, why string) {
	e := &ChurnEvent{Kind: "remove", Why: why, Backend: b.name, Address: b.addr}
	r.takeOut(ctx, e)
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	if b.srv.Shutdown(sctx) != nil {
		b.srv.Close()
	}
	cancel()
	b.stopSim()
	e.gone = time.Now()
	delete(r.backends, b.name)
	r.events = append(r.events, e)
	r.logEvent(e)
}

// kill closes a backend's server at once, its connections cut, while it is
// still in the DNS, and takes it out of the DNS churnKillDNSDelay later.
func (r *churnRun) kill(ctx context.Context, b *churnBackend) {
	e := &ChurnEvent{Kind: "kill", Why: "kill", Backend: b.name, Address: b.addr}
	e.kill = time.Now()
	b.srv.Close()
	b.stopSim()
	e.gone = e.kill
	delete(r.backends, b.name)
	e.released, _ = r.poller.wait(ctx, churnKillDNSDelay, func(s hostSnapshot) bool {
		h, ok := s.find(b.addr)
		return !ok || h.InFlightRequests == 0
	})
	sleep(ctx, time.Until(e.kill.Add(churnKillDNSDelay)))
	r.takeOut(ctx, e)
	e.ejected = r.poller.downSince(b.addr, e.kill)
	r.events = append(r.events, e)
	r.logEvent(e)
}

// churnSample is one request of the churn load as the client saw it.
type churnSample struct {
	sample
	id string
}

// churnLoad sends reqs (again from the first, if they run out) at Poisson
// arrivals at rate, each with its number in churnIDHeader, until stop is
// closed, and waits for every response.
func churnLoad(ctx context.Context, client *http.Client, url string, reqs []Request, rate float64, seed uint64, stop <-chan struct{}) []churnSample {
	rng := rand.New(rand.NewPCG(seed, 0xa441))
	var (
		wg  sync.WaitGroup
		mu  sync.Mutex
		out []churnSample
	)
	start := time.Now()
	at := time.Duration(0)
	for i := 0; ; i++ {
		at += time.Duration(rng.ExpFloat64() / rate * float64(time.Second))
		t := time.NewTimer(time.Until(start.Add(at)))
		select {
		case <-ctx.Done():
		case <-stop:
		case <-t.C:
		}
		t.Stop()
		if ctx.Err() != nil || isClosed(stop) {
			break
		}
		id := strconv.Itoa(i)
		r := reqs[i%len(reqs)]
		wg.Go(func() {
			s := sendHeaders(ctx, client, url, r, map[string]string{churnIDHeader: id})
			mu.Lock()
			out = append(out, churnSample{s, id})
			mu.Unlock()
		})
	}
	wg.Wait()
	return out
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// churnHost is what /debug/hosts shows of a host, as far as the churn run
// reads it.
type churnHost struct {
	Address          string `json:"address"`
	InFlightTokens   int64  `json:"in_flight_tokens"`
	Load             int64  `json:"load"`
	InFlightRequests int64  `json:"in_flight_requests"`
	Removed          bool   `json:"removed,omitempty"`
	Health           struct {
		Down   bool   `json:"down"`
		Reason string `json:"reason,omitempty"`
	} `json:"health"`
	Source string `json:"source,omitempty"`
}

// hostSnapshot is one reading of /debug/hosts.
type hostSnapshot struct {
	at    time.Time // when the answer came
	hosts []churnHost
}

func (s hostSnapshot) find(addr string) (churnHost, bool) {
	for _, h := range s.hosts {
		if h.Address == addr {
			return h, true
		}
	}
	return churnHost{}, false
}

// active: tokenlb lists addr as a host it may pick.
func (s hostSnapshot) active(addr string) bool {
	h, ok := s.find(addr)
	return ok && !h.Removed
}

// drained: addr is removed with nothing in flight, or no longer listed.
func (s hostSnapshot) drained(addr string) bool {
	h, ok := s.find(addr)
	return !ok || h.Removed && h.InFlightRequests == 0 && h.Load == 0 && h.InFlightTokens == 0
}

// idle: no host has anything in flight.
func (s hostSnapshot) idle() bool {
	for _, h := range s.hosts {
		if h.InFlightRequests != 0 || h.Load != 0 || h.InFlightTokens != 0 {
			return false
		}
	}
	return !s.at.IsZero()
}

// hostDown is a host tokenlb showed down.
type hostDown struct {
	addr, reason string
	at           time.Time
}

// hostPoller reads tokenlb's /debug/hosts every churnPoll.
type hostPoller struct {
	url    string
	client *http.Client

	mu    sync.Mutex
	snap  hostSnapshot
	next  chan struct{} // closed at the next snapshot
	downs []hostDown    // each time a host went from up to down
	down  map[string]bool
}

func newHostPoller(url string) *hostPoller {
	return &hostPoller{url: url, client: &http.Client{Timeout: 2 * time.Second}, next: make(chan struct{}), down: map[string]bool{}}
}

func (p *hostPoller) run(ctx context.Context) {
	t := time.NewTicker(churnPoll)
	defer t.Stop()
	for {
		p.poll(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (p *hostPoller) poll(ctx context.Context) {
	req, _ := http.NewRequestWithContext(ctx, "GET", p.url, nil)
	resp, err := p.client.Do(req)
	if err != nil {
		return
	}
	defer resp.Body.Close()
	var v struct {
		Hosts []churnHost `json:"hosts"`
	}
	if resp.StatusCode != 200 || json.NewDecoder(resp.Body).Decode(&v) != nil {
		return
	}
	at := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, h := range v.Hosts {
		if h.Health.Down && !p.down[h.Address] {
			p.downs = append(p.downs, hostDown{h.Address, h.Health.Reason, at})
		}
		p.down[h.Address] = h.Health.Down
	}
	p.snap = hostSnapshot{at: at, hosts: v.Hosts}
	close(p.next)
	p.next = make(chan struct{})
}

func (p *hostPoller) last() hostSnapshot {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.snap
}

// wait returns the time of the first snapshot, from now on (the latest one
// included), for which cond holds; false if none did within timeout.
func (p *hostPoller) wait(ctx context.Context, timeout time.Duration, cond func(hostSnapshot) bool) (time.Time, bool) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		p.mu.Lock()
		snap, next := p.snap, p.next
		p.mu.Unlock()
		if !snap.at.IsZero() && cond(snap) {
			return snap.at, true
		}
		select {
		case <-next:
		case <-ctx.Done():
			return time.Time{}, false
		case <-deadline.C:
			return time.Time{}, false
		}
	}
}

// downSince returns when tokenlb first showed addr down at or after t.
func (p *hostPoller) downSince(addr string, t time.Time) time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, d := range p.downs {
		if d.addr == addr && !d.at.Before(t) {
			return d.at
		}
	}
	return time.Time{}
}

func (p *hostPoller) ejections() []hostDown {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.downs)
}

// scrapeCounter returns the sum of a counter's series in a Prometheus
// text exposition at url; -1 if it cannot be read.
func scrapeCounter(url, name string) float64 {
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get(url)
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil || families[name] == nil {
		return -1
	}
	var sum float64
	for _, m := range families[name].GetMetric() {
		sum += m.GetCounter().GetValue()
	}
	return sum
}

// churnRequest is one request of a churn run as the client, the backends
// and Envoy's access log saw it.
type churnRequest struct {
	ID    string
	Start time.Time // the client sent it
	// Arrived is when a backend received it (zero: none did); Host the
	// address it was routed to: the upstream host in Envoy's access log,
	// else the backend that received it ("": not known).
	Arrived time.Time
	Host    string
	Err     string // "" for a request that succeeded
	// From the access log.
	Code, Flags, Details string
	TTFT, E2E            time.Duration
}

// pickedAt is when the request was routed, as near as it can be seen: when
// a backend received it, else when the client sent it.
func (q churnRequest) pickedAt() time.Time {
	if !q.Arrived.IsZero() {
		return q.Arrived
	}
	return q.Start
}

// ClassifyFailure returns the cause of a failed request (one of
// ChurnCauses), given the run's events.
func ClassifyFailure(q churnRequest, events []ChurnEvent) string {
	if q.Host == "" {
		return CauseOther
	}
	t := q.pickedAt()
	for _, e := range events {
		if e.Address != q.Host {
			continue
		}
		switch e.Kind {
		case "kill":
			switch {
			case t.Before(e.kill):
				return CauseInFlightKilled
			case e.seen.IsZero() || t.Before(e.seen):
				return CauseKilledBeforeRemoval
			default:
				return CauseRemovedAfterChange
			}
		case "remove":
			if !e.seen.IsZero() && !t.Before(e.seen) {
				return CauseRemovedAfterChange
			}
		}
	}
	return CauseOther
}

// AnalyzeChurn measures a churn run from its events and requests: each
// event's measures and failures, and the run's failures by cause. start is
// when the load began; times in the result are ms since then.
func AnalyzeChurn(start time.Time, events []ChurnEvent, reqs []churnRequest) ChurnRun {
	run := ChurnRun{Requests: len(reqs), Failures: map[string]int{}}
	for _, c := range ChurnCauses {
		run.Failures[c] = 0
	}
	byHost := map[string][]churnRequest{}
	var ttfts, e2es []float64
	for _, q := range reqs {
		if q.Host != "" {
			byHost[q.Host] = append(byHost[q.Host], q)
		}
		if q.Err == "" {
			ttfts, e2es = append(ttfts, ms(q.TTFT)), append(e2es, ms(q.E2E))
			continue
		}
		run.Errors++
		cause := ClassifyFailure(q, events)
		run.Failures[cause]++
		if len(run.FailedRequests) < 100 {
			run.FailedRequests = append(run.FailedRequests, ChurnFailure{ID: q.ID, SentMs: ms(q.Start.Sub(start)), RoutedMs: ms(q.pickedAt().Sub(start)),
				Host: q.Host, Cause: cause, Status: q.Code, Flags: q.Flags, Details: q.Details, Err: q.Err})
		}
		if cause == CauseOther && len(run.FailureSamples) < 10 {
			run.FailureSamples = append(run.FailureSamples, fmt.Sprintf("request %s at %.0f ms, host %q, status %s %s %s: %.200s",
				q.ID, ms(q.Start.Sub(start)), q.Host, q.Code, q.Flags, q.Details, q.Err))
		}
	}
	run.TTFT, run.E2E = summarize(ttfts), summarize(e2es)
	for _, e := range events {
		e.Measures = measureEvent(e, byHost[e.Address], reqs)
		for _, q := range byHost[e.Address] {
			if e.Kind != "add" && !e.seen.IsZero() && !q.pickedAt().Before(e.seen) && len(e.AfterSeen) < 20 {
				p := ChurnPick{ID: q.ID, SentMs: ms(q.Start.Sub(start)), Failed: q.Err != ""}
				if !q.Arrived.IsZero() {
					p.ArrivedMs = ms(q.Arrived.Sub(start))
				}
				e.AfterSeen = append(e.AfterSeen, p)
			}
			if q.Err != "" {
				if e.Failures == nil {
					e.Failures = map[string]int{}
				}
				e.Failures[ClassifyFailure(q, events)]++
			}
		}
		failed := 0
		for _, n := range e.Failures {
			failed += n
		}
		if e.Kind != "add" {
			e.Measures["failed"] = float64(failed)
		}
		at := func(t time.Time) *float64 {
			if t.IsZero() {
				return nil
			}
			v := ms(t.Sub(start))
			return &v
		}
		e.KillMs, e.ReleasedMs, e.DNSMs, e.SeenMs, e.ShownMs = at(e.kill), at(e.released), at(e.dns), at(e.seen), at(e.shown)
		e.EjectedMs, e.DrainedMs = at(e.ejected), at(e.drained)
		if e.Kind != "kill" {
			e.GoneMs = at(e.gone)
		}
		run.Events = append(run.Events, e)
	}
	return run
}

// measureEvent returns an event's measures (churnMeasures) from the
// requests routed to its host (on) and every request (all); a measure whose
// times never came is left out.
func measureEvent(e ChurnEvent, on, all []churnRequest) map[string]float64 {
	m := map[string]float64{}
	set := func(name string, from, to time.Time) {
		if !from.IsZero() && !to.IsZero() {
			m[name] = ms(to.Sub(from))
		}
	}
	var first, last time.Time
	for _, q := range on {
		t := q.pickedAt()
		if first.IsZero() || t.Before(first) {
			first = t
		}
		if t.After(last) {
			last = t
		}
	}
	count := func(from time.Time) float64 {
		if from.IsZero() {
			return 0
		}
		n := 0
		for _, q := range on {
			if !q.pickedAt().Before(from) {
				n++
			}
		}
		return float64(n)
	}
	set("dns_to_seen_ms", e.dns, e.seen)
	switch e.Kind {
	case "add":
		set("seen_to_shown_ms", e.seen, e.shown)
		set("seen_to_first_request_ms", e.seen, first)
		set("dns_to_first_request_ms", e.dns, first)
		if !e.seen.IsZero() {
			end := e.seen.Add(churnShareWindow)
			n, mine := 0, 0
			for _, q := range all {
				if t := q.pickedAt(); q.Host != "" && !t.Before(e.seen) && t.Before(end) {
					n++
					if q.Host == e.Address {
						mine++
					}
				}
			}
			if n > 0 {
				m["share_next_5s"] = float64(mine) / float64(n)
			}
		}
	case "remove":
		set("seen_to_shown_ms", e.seen, e.shown)
		set("seen_to_last_pick_ms", e.seen, last)
		m["picks_after_seen"] = count(e.seen)
		set("seen_to_drained_ms", e.seen, e.drained)
		set("drained_to_gone_ms", e.drained, e.gone)
	case "kill":
		set("kill_to_released_ms", e.kill, e.released)
		set("kill_to_ejected_ms", e.kill, e.ejected)
		m["picks_after_kill"] = count(e.kill)
		set("kill_to_dns_ms", e.kill, e.dns)
		set("seen_to_last_pick_ms", e.seen, last)
		m["picks_after_seen"] = count(e.seen)
	}
	return m
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// Summarize sets r.Summary (each measure's median and max over the events
// of every seed) and r.Targets.
func (r *ChurnReport) Summarize() {
	r.Summary = nil
	for _, kind := range []string{"add", "remove", "kill"} {
		for _, name := range churnMeasures[kind] {
			var v []float64
			for _, run := range r.Runs {
				for _, e := range run.Events {
					if x, ok := e.Measures[name]; ok && e.Kind == kind {
						v = append(v, x)
					}
				}
			}
			if len(v) == 0 {
				continue
			}
			r.Summary = append(r.Summary, ChurnStat{Kind: kind, Measure: name, Events: len(v), Median: median(v), Max: slices.Max(v)})
		}
	}
	r.Targets = r.checks()
}

// stat returns the summary of a measure, and whether there is one.
func (r *ChurnReport) stat(kind, measure string) (ChurnStat, bool) {
	for _, s := range r.Summary {
		if s.Kind == kind && s.Measure == measure {
			return s, true
		}
	}
	return ChurnStat{}, false
}

// checks holds the runs against the targets.
func (r *ChurnReport) checks() []ChurnCheck {
	var out []ChurnCheck
	// A new ready host gets traffic within 2 s: of the DNS change, and of
	// tokenlb showing it (the DNS interval aside).
	adds, missing := 0, 0
	for _, run := range r.Runs {
		for _, e := range run.Events {
			if e.Kind == "add" {
				adds++
				if _, ok := e.Measures["dns_to_first_request_ms"]; !ok {
					missing++
				}
			}
		}
	}
	dnsFirst, _ := r.stat("add", "dns_to_first_request_ms")
	seenFirst, _ := r.stat("add", "seen_to_first_request_ms")
	out = append(out, ChurnCheck{Target: "a new ready endpoint receives traffic within 2 s (of its DNS change)",
		Measured: fmt.Sprintf("max %.0f ms over %d additions (median %.0f)%s", dnsFirst.Max, adds, dnsFirst.Median, never(missing)),
		Met:      missing == 0 && adds > 0 && dnsFirst.Max <= 2000})
	out = append(out, ChurnCheck{Target: "… and within 2 s of tokenlb showing it",
		Measured: fmt.Sprintf("max %.0f ms (median %.0f)", seenFirst.Max, seenFirst.Median),
		Met:      missing == 0 && adds > 0 && seenFirst.Max <= 2000})
	// A removed host gets no new request more than 1 s after tokenlb shows
	// the change.
	worst, removals, unseen := -1e18, 0, 0
	for _, run := range r.Runs {
		for _, e := range run.Events {
			if e.Kind == "add" {
				continue
			}
			removals++
			if e.SeenMs == nil {
				unseen++
			}
			if v, ok := e.Measures["seen_to_last_pick_ms"]; ok {
				worst = max(worst, v)
			}
		}
	}
	late := fmt.Sprintf("latest pick %.0f ms after tokenlb showed the removal", worst)
	if worst < 0 {
		late = fmt.Sprintf("no pick after tokenlb showed the removal (the last %.0f ms before)", -worst)
	}
	out = append(out, ChurnCheck{Target: "a removed endpoint gets no new request more than 1 s after the change is visible to tokenlb",
		Measured: fmt.Sprintf("%s, over %d removals%s", late, removals, never(unseen)), Met: removals > 0 && unseen == 0 && worst <= 1000})
	// Graceful removals and additions fail nothing; a kill fails only what
	// was in flight on the killed host.
	graceful, killedExtra, inFlight, other := 0, 0, 0, 0
	for _, run := range r.Runs {
		for _, e := range run.Events {
			for cause, n := range e.Failures {
				switch {
				case e.Kind != "kill":
					graceful += n
				case cause == CauseInFlightKilled:
					inFlight += n
				default:
					killedExtra += n
				}
			}
		}
		other += run.Failures[CauseOther]
	}
	out = append(out, ChurnCheck{Target: "a graceful scale-down or rolling restart under load fails 0 requests",
		Measured: fmt.Sprintf("%d failed on removed or added hosts, %d failed elsewhere (other), all seeds", graceful, other),
		Met:      graceful == 0 && other == 0})
	out = append(out, ChurnCheck{Target: "a killed backend fails only the requests in flight on it",
		Measured: fmt.Sprintf("%d in flight, %d more (sent to it after it died), all seeds", inFlight, killedExtra),
		Met:      killedExtra == 0})
	zero, swept := true, 0.0
	for _, run := range r.Runs {
		zero = zero && run.HostsAtZero
		swept += max(0, run.SweptTokens)
		if run.SweptTokens < 0 {
			zero = false
		}
	}
	out = append(out, ChurnCheck{Target: "every host returns to 0 load after churn; the sweeper reclaims nothing",
		Measured: fmt.Sprintf("hosts at 0 in every run: %v; tokens swept: %g", zero, swept), Met: zero && swept == 0})
	return out
}

func never(n int) string {
	if n == 0 {
		return ""
	}
	return fmt.Sprintf("; %d never", n)
}

// Table renders the report as markdown: the targets, each measure's median
// and max, and each seed's failures and end state.
func (r *ChurnReport) Table() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Churn (%s), seeds %v.\n\n", r.Mode, r.Seeds)
	b.WriteString("| target | measured | met |\n|---|---|---|\n")
	for _, c := range r.Targets {
		met := "no"
		if c.Met {
			met = "yes"
		}
		fmt.Fprintf(&b, "| %s | %s | %s |\n", c.Target, c.Measured, met)
	}
	b.WriteString("\n| event | measure | events | median | max |\n|---|---|---|---|---|\n")
	for _, s := range r.Summary {
		f := "%.0f"
		if s.Measure == "share_next_5s" {
			f = "%.2f"
		}
		fmt.Fprintf(&b, "| %s | %s | %d | "+f+" | "+f+" |\n", s.Kind, s.Measure, s.Events, s.Median, s.Max)
	}
	b.WriteString("\n| seed | rate req/s | requests | failed | ")
	b.WriteString(strings.Join(ChurnCauses, " | "))
	b.WriteString(" | hosts at 0 (ms after the last response) | swept tokens | TTFT p50 / p90 ms | E2E mean ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, run := range r.Runs {
		fmt.Fprintf(&b, "| %d | %.1f | %d | %d |", run.Seed, run.RateRPS, run.Requests, run.Errors)
		for _, c := range ChurnCauses {
			fmt.Fprintf(&b, " %d |", run.Failures[c])
		}
		zero := "no"
		if run.HostsAtZero {
			zero = fmt.Sprintf("yes (%.0f)", run.ZeroAfterMs)
		}
		fmt.Fprintf(&b, " %s | %g | %.0f / %.0f | %.0f |\n", zero, run.SweptTokens, run.TTFT.P50, run.TTFT.P90, run.E2E.Mean)
	}
	b.WriteString("\nEvents (ms since the load began; durations in ms):\n\n| seed | event | backend | DNS change | seen by tokenlb | measures | failed |\n|---|---|---|---|---|---|---|\n")
	for _, run := range r.Runs {
		for _, e := range run.Events {
			var ms []string
			for _, name := range churnMeasures[e.Kind] {
				f := "%s %.0f"
				if name == "share_next_5s" {
					f = "%s %.2f"
				}
				if v, ok := e.Measures[name]; ok && name != "failed" {
					ms = append(ms, fmt.Sprintf(f, name, v))
				}
			}
			var fs []string
			for _, c := range ChurnCauses {
				if n := e.Failures[c]; n > 0 {
					fs = append(fs, fmt.Sprintf("%d %s", n, c))
				}
			}
			fmt.Fprintf(&b, "| %d | %s (%s) | %s %s | %s | %s | %s | %s |\n", run.Seed, e.Kind, e.Why, e.Backend, e.Address,
				optMs(e.DNSMs), optMs(e.SeenMs), strings.Join(ms, ", "), strings.Join(fs, ", "))
		}
	}
	return b.String()
}

func optMs(v *float64) string {
	if v == nil {
		return "never"
	}
	return fmt.Sprintf("%.0f", *v)
}

// tokenlbLog is what tokenlb's log says of the hosts: when each address was
// first added, removed and ejected.
type tokenlbLog struct {
	added, removed, ejected map[string]time.Time
}

// seen returns when the log says tokenlb applied an event's change: the
// address added (add) or removed (remove, kill); zero if it does not say.
func (l tokenlbLog) seen(kind, addr string) time.Time {
	if kind == "add" {
		return l.added[addr]
	}
	return l.removed[addr]
}

// readTokenlbLog reads the log of the tokenlb started in dir.
func readTokenlbLog(dir string) tokenlbLog {
	paths, _ := filepath.Glob(filepath.Join(dir, "tokenlb-*.log"))
	if len(paths) == 0 {
		return tokenlbLog{}
	}
	f, err := os.Open(paths[0])
	if err != nil {
		return tokenlbLog{}
	}
	defer f.Close()
	return parseTokenlbLog(f)
}

// parseTokenlbLog reads tokenlb's log in its text format (slog's): the
// lines "hosts changed" (added=[…] removed=[…]) and "host ejected…"
// (host=…). Lines it does not understand are skipped.
func parseTokenlbLog(r io.Reader) tokenlbLog {
	l := tokenlbLog{added: map[string]time.Time{}, removed: map[string]time.Time{}, ejected: map[string]time.Time{}}
	note := func(m map[string]time.Time, addr string, t time.Time) {
		if _, ok := m[addr]; !ok {
			m[addr] = t
		}
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		f := logFields(sc.Text())
		t, err := time.Parse(time.RFC3339Nano, f["time"])
		if err != nil {
			continue
		}
		switch msg := f["msg"]; {
		case msg == "hosts changed":
			for _, a := range strings.Fields(strings.Trim(f["added"], "[]")) {
				note(l.added, a, t)
			}
			for _, a := range strings.Fields(strings.Trim(f["removed"], "[]")) {
				note(l.removed, a, t)
			}
		case strings.HasPrefix(msg, "host ejected") && f["host"] != "":
			note(l.ejected, f["host"], t)
		}
	}
	return l
}

// logFields splits a line of slog's text format into its keys and values
// (a quoted value unquoted).
func logFields(line string) map[string]string {
	out := map[string]string{}
	for {
		line = strings.TrimLeft(line, " ")
		k, rest, ok := strings.Cut(line, "=")
		if !ok || k == "" || strings.ContainsRune(k, ' ') {
			return out
		}
		var v string
		if strings.HasPrefix(rest, `"`) {
			q, err := strconv.QuotedPrefix(rest)
			if err != nil {
				return out
			}
			v, _ = strconv.Unquote(q)
			rest = rest[len(q):]
		} else {
			v, rest, _ = strings.Cut(rest, " ")
		}
		out[k] = v
		line = rest
	}
}
