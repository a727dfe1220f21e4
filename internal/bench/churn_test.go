package bench

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

// churnFixture is a run's events on a made-up clock: backend-4 added at
// 1 s (seen at 1.5 s), backend-1 removed at 3 s (seen at 3.4 s), backend-3
// killed at 6 s and taken out of the DNS at 9 s (shown down at 6.2 s, seen
// removed at 9.3 s).
func churnFixture() (start time.Time, events []ChurnEvent) {
	start = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	at := func(ms int) time.Time { return start.Add(time.Duration(ms) * time.Millisecond) }
	return start, []ChurnEvent{
		{Kind: "add", Why: "scale-up", Backend: "backend-4", Address: "127.0.0.5:80", dns: at(1000), seen: at(1500), shown: at(1520)},
		{Kind: "remove", Why: "scale-down", Backend: "backend-1", Address: "127.0.0.2:80", dns: at(3000), seen: at(3400),
			drained: at(4000), gone: at(4100)},
		{Kind: "kill", Why: "kill", Backend: "backend-3", Address: "127.0.0.4:80", kill: at(6000), released: at(6050), ejected: at(6200),
			dns: at(9000), seen: at(9300), drained: at(9300), gone: at(6000)},
	}
}

func TestClassifyFailure(t *testing.T) {
	start, events := churnFixture()
	at := func(ms int) time.Time { return start.Add(time.Duration(ms) * time.Millisecond) }
	for _, tc := range []struct {
		name string
		q    churnRequest
		want string
	}{
		{"reached the killed host before it died", churnRequest{Start: at(5000), Arrived: at(5010), Host: "127.0.0.4:80"}, CauseInFlightKilled},
		{"sent before the kill, never arrived", churnRequest{Start: at(5999), Host: "127.0.0.4:80"}, CauseInFlightKilled},
		{"sent to the dead host before its removal showed", churnRequest{Start: at(6100), Host: "127.0.0.4:80"}, CauseKilledBeforeRemoval},
		{"sent to the dead host after its removal showed", churnRequest{Start: at(9400), Host: "127.0.0.4:80"}, CauseRemovedAfterChange},
		{"routed to a gracefully removed host after the change", churnRequest{Start: at(3390), Arrived: at(3500), Host: "127.0.0.2:80"}, CauseRemovedAfterChange},
		{"on a gracefully removed host, before the change", churnRequest{Start: at(3000), Arrived: at(3100), Host: "127.0.0.2:80"}, CauseOther},
		{"on a host that stayed", churnRequest{Start: at(6100), Host: "127.0.0.3:80"}, CauseOther},
		{"no host known (tokenlb refused it)", churnRequest{Start: at(6100)}, CauseOther},
	} {
		tc.q.Err = "failed"
		if got := ClassifyFailure(tc.q, events); got != tc.want {
			t.Errorf("%s: %s, want %s", tc.name, got, tc.want)
		}
	}
	// A kill whose removal tokenlb never showed: everything after the kill
	// was sent to a dead host before its removal.
	events[2].seen = time.Time{}
	if got := ClassifyFailure(churnRequest{Start: at(20000), Host: "127.0.0.4:80", Err: "x"}, events); got != CauseKilledBeforeRemoval {
		t.Errorf("removal never seen: %s", got)
	}
}

func TestAnalyzeChurn(t *testing.T) {
	start, events := churnFixture()
	at := func(ms int) time.Time { return start.Add(time.Duration(ms) * time.Millisecond) }
	ok := func(id string, sent, arrived int, host string) churnRequest {
		return churnRequest{ID: id, Start: at(sent), Arrived: at(arrived), Host: host, TTFT: 50 * time.Millisecond, E2E: 500 * time.Millisecond}
	}
	reqs := []churnRequest{
		ok("0", 500, 505, "127.0.0.2:80"),
		ok("1", 1600, 1620, "127.0.0.3:80"),
		ok("2", 1700, 1710, "127.0.0.5:80"), // backend-4's first: 210 ms after seen
		ok("3", 2000, 2010, "127.0.0.5:80"),
		ok("4", 3300, 3350, "127.0.0.2:80"), // backend-1's last pick, 50 ms before seen
		ok("5", 5500, 5505, "127.0.0.4:80"),
		{ID: "6", Start: at(5800), Arrived: at(5810), Host: "127.0.0.4:80", Err: "stream ended"}, // in flight at the kill
		{ID: "7", Start: at(6100), Host: "127.0.0.4:80", Err: "status 503", Code: "503", Flags: "UF"},
		{ID: "8", Start: at(6150), Host: "127.0.0.4:80", Err: "status 503", Code: "503", Flags: "UF"},
		{ID: "9", Start: at(7000), Err: "status 503: tokenlb"},
	}
	run := AnalyzeChurn(start, events, reqs)
	if run.Requests != 10 || run.Errors != 4 || run.Failures[CauseInFlightKilled] != 1 || run.Failures[CauseKilledBeforeRemoval] != 2 ||
		run.Failures[CauseOther] != 1 || run.Failures[CauseRemovedAfterChange] != 0 || len(run.FailureSamples) != 1 {
		t.Fatalf("run %+v", run)
	}
	add, rm, kill := run.Events[0].Measures, run.Events[1].Measures, run.Events[2].Measures
	if add["dns_to_seen_ms"] != 500 || add["seen_to_shown_ms"] != 20 || add["seen_to_first_request_ms"] != 210 || add["dns_to_first_request_ms"] != 710 {
		t.Errorf("add %v", add)
	}
	// In the 5 s after backend-4 showed (1.5 to 6.5 s): 2 of the 8 routed
	// requests went to it.
	if add["share_next_5s"] != 2.0/8 {
		t.Errorf("share %v", add["share_next_5s"])
	}
	if rm["dns_to_seen_ms"] != 400 || rm["seen_to_last_pick_ms"] != -50 || rm["picks_after_seen"] != 0 ||
		rm["seen_to_drained_ms"] != 600 || rm["drained_to_gone_ms"] != 100 || rm["failed"] != 0 {
		t.Errorf("remove %v", rm)
	}
	if kill["kill_to_released_ms"] != 50 || kill["kill_to_ejected_ms"] != 200 || kill["picks_after_kill"] != 2 || kill["kill_to_dns_ms"] != 3000 || kill["dns_to_seen_ms"] != 300 ||
		kill["seen_to_last_pick_ms"] != 6150-9300 || kill["picks_after_seen"] != 0 || kill["failed"] != 3 {
		t.Errorf("kill %v", kill)
	}
	if f := run.FailedRequests; len(f) != 4 || f[1] != (ChurnFailure{ID: "7", SentMs: 6100, RoutedMs: 6100, Host: "127.0.0.4:80",
		Cause: CauseKilledBeforeRemoval, Status: "503", Flags: "UF", Err: "status 503"}) {
		t.Errorf("failed requests %+v", f)
	}
	if a := run.Events[1].AfterSeen; len(a) != 0 {
		t.Errorf("picks after backend-1's removal %+v", a)
	}
	if f := run.Events[2].Failures; f[CauseInFlightKilled] != 1 || f[CauseKilledBeforeRemoval] != 2 {
		t.Errorf("kill failures %v", f)
	}
	if e := run.Events[2]; e.KillMs == nil || *e.KillMs != 6000 || e.GoneMs != nil || *e.SeenMs != 9300 || *e.EjectedMs != 6200 {
		t.Errorf("kill times %+v", e)
	}

	// A request that reached backend-1 after its removal showed is listed.
	late := AnalyzeChurn(start, events, []churnRequest{ok("10", 3395, 3401, "127.0.0.2:80")})
	if a, m := late.Events[1].AfterSeen, late.Events[1].Measures; len(a) != 1 || a[0] != (ChurnPick{ID: "10", SentMs: 3395, ArrivedMs: 3401}) ||
		m["picks_after_seen"] != 1 || m["seen_to_last_pick_ms"] != 1 {
		t.Errorf("late pick %+v %v", a, m)
	}

	// Two seeds alike: the targets. The kill's two extra failures miss its
	// target; the rest are met but for the "other" failure.
	run.HostsAtZero, run.Seed = true, 1
	run2 := run
	run2.Seed = 2
	rep := &ChurnReport{Mode: "test", Seeds: []uint64{1, 2}, Runs: []ChurnRun{run, run2}}
	rep.Summarize()
	if s, _ := rep.stat("add", "seen_to_first_request_ms"); s.Events != 2 || s.Median != 210 || s.Max != 210 {
		t.Errorf("summary %+v", s)
	}
	met := map[string]bool{}
	for _, c := range rep.Targets {
		met[strings.Fields(c.Target)[1]] = c.Met
	}
	want := map[string]bool{"new": true, "and": true, "removed": true, "graceful": false, "killed": false, "host": true}
	for k, v := range want {
		if met[k] != v {
			t.Errorf("target %q met %v, want %v (%+v)", k, met[k], v, rep.Targets)
		}
	}
	tab := rep.Table()
	for _, s := range []string{"| a killed backend fails only the requests in flight on it | 2 in flight, 4 more (sent to it after it died), all seeds | no |",
		"| add | seen_to_first_request_ms | 2 | 210 | 210 |", "| 1 | 0.0 | 10 | 4 | 1 | 2 | 0 | 1 | yes (0) | 0 |"} {
		if !strings.Contains(tab, s) {
			t.Errorf("table lacks %q:\n%s", s, tab)
		}
	}
}

func TestHostSnapshot(t *testing.T) {
	s := hostSnapshot{at: time.Now(), hosts: []churnHost{
		{Address: "a", InFlightRequests: 1, Load: 10},
		{Address: "b", Removed: true, InFlightRequests: 1, Load: 5},
		{Address: "c", Removed: true},
	}}
	if !s.active("a") || s.active("b") || s.active("d") {
		t.Error("active")
	}
	if s.drained("a") || s.drained("b") || !s.drained("c") || !s.drained("d") {
		t.Error("drained")
	}
	if s.idle() {
		t.Error("idle with requests in flight")
	}
	s.hosts = s.hosts[2:]
	if !s.idle() {
		t.Error("not idle")
	}
}

func TestAccessLog(t *testing.T) {
	cfg := []byte(`static_resources:
  listeners:
  - filter_chains:
    - filters:
      - typed_config: {stat_prefix: llm}
`)
	out, err := withAccessLog(cfg, "/tmp/x.log")
	if err != nil {
		t.Fatal(err)
	}
	var root map[string]any
	if err := yaml.Unmarshal(out, &root); err != nil {
		t.Fatal(err)
	}
	if s := string(out); !strings.Contains(s, "path: /tmp/x.log") || !strings.Contains(s, "'%REQ(X-BENCH-ID)%'") ||
		!strings.Contains(s, "stat_prefix: llm") {
		t.Fatalf("config:\n%s", s)
	}
	if _, err := withAccessLog([]byte("static_resources: {}\n"), "x"); err == nil {
		t.Error("a configuration without listeners accepted")
	}
	path := filepath.Join(t.TempDir(), "access.log")
	os.WriteFile(path, []byte(`{"id":"7","upstream":"127.0.0.4:80","code":503,"flags":"UF","details":"upstream_reset_before_response_started{connection_failure}"}
not json
{"id":"-","upstream":"-","code":200}
{"id":"8","upstream":"127.0.0.3:80","code":200,"flags":"-"}
`), 0o600)
	entries, err := parseAccessLog(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 2 || entries["7"].upstream != "127.0.0.4:80" || entries["7"].code != "503" || entries["7"].flags != "UF" ||
		entries["8"].code != "200" {
		t.Fatalf("entries %+v", entries)
	}
}

func TestParseTokenlbLog(t *testing.T) {
	log := `time=2026-12-03T20:20:50.001Z level=INFO msg="tokenlb serving" ext_proc=127.0.0.1:1 hosts="[127.0.0.2:80 127.0.0.3:80]"
time=2026-12-03T20:20:57.680Z level=INFO msg="hosts changed" added=[127.0.0.5:80] removed=[] hosts="[127.0.0.2:80 127.0.0.3:80 127.0.0.5:80]"
time=2026-12-03T20:21:04.681Z level=INFO msg="hosts changed" added="[127.0.0.6:80 127.0.0.7:80]" removed=[127.0.0.2:80] hosts="[…]"
time=2026-12-03T20:21:19.572Z level=WARN msg="host ejected: responses fail" host=127.0.0.4:80 status=503 in_a_row=3 for=5s
time=2026-12-03T20:21:29.572Z level=WARN msg="host ejected: responses fail" host=127.0.0.4:80 status=503 in_a_row=3 for=10s
not a log line
`
	l := parseTokenlbLog(strings.NewReader(log))
	at := func(s string) time.Time { t, _ := time.Parse(time.RFC3339Nano, s); return t }
	if got := l.seen("add", "127.0.0.5:80"); !got.Equal(at("2026-12-03T20:20:57.680Z")) {
		t.Errorf("added %v", got)
	}
	if got := l.seen("add", "127.0.0.7:80"); !got.Equal(at("2026-12-03T20:21:04.681Z")) {
		t.Errorf("added in a list %v", got)
	}
	if got := l.seen("remove", "127.0.0.2:80"); !got.Equal(at("2026-12-03T20:21:04.681Z")) {
		t.Errorf("removed %v", got)
	}
	if got := l.ejected["127.0.0.4:80"]; !got.Equal(at("2026-12-03T20:21:19.572Z")) {
		t.Errorf("ejected %v (the first)", got)
	}
	if !l.seen("kill", "127.0.0.9:80").IsZero() || len(l.added) != 3 {
		t.Errorf("log %+v", l)
	}
}
