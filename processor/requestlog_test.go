package processor_test

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"sync"
	"testing"

	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"

	"github.com/tokenlb/tokenlb/cost"
	"github.com/tokenlb/tokenlb/picker"
	"github.com/tokenlb/tokenlb/processor"
)

// logLines collects JSON log lines, safe for the streams' goroutines.
type logLines struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logLines) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// with returns the lines whose msg is msg.
func (l *logLines) with(t *testing.T, msg string) []map[string]any {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(l.b.String()), "\n") {
		if line == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		if m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// TestRequestLog: every routed request gets one line at info when it ends,
// with what was asked, where it went and why, and how it ended (durations in
// seconds); a 5xx's is a warning, a cut stream's says so; rejections get a
// line at info with their reason; with LogRequests 0 there are none.
func TestRequestLog(t *testing.T) {
	lines := &logLines{}
	log := slog.New(slog.NewJSONHandler(lines, &slog.HandlerOptions{Level: slog.LevelInfo}))
	env := startEnv(t, threeHosts, picker.Options{}, Config{Cost: cost.New(twoPhase), LogRequests: 1, Logger: log})

	// A successful request, its response seen to the end.
	f := env.open(t, buffered)
	f.respMode = filterv3.ProcessingMode_STREAMED
	req := post(chat(100))
	req.headers["x-request-id"] = "req-ok"
	out := routed(t, f, req)
	step(t, f, respHeadersTyped("200", "application/json"))
	step(t, f, respBody(`{"choices":[{"message":{"content":"a b c"}}],"usage":{"prompt_tokens":120,"completion_tokens":3}}`, true))
	f.close()
	env.waitEnded(t, 1)

	// A backend's 503.
	f = env.open(t, buffered)
	f.respMode = filterv3.ProcessingMode_STREAMED
	req = post(chat(10))
	req.headers["x-request-id"] = "req-503"
	routed(t, f, req)
	step(t, f, respHeadersTyped("503", "application/json"))
	step(t, f, respBody(`{"error":{"message":"busy"}}`, true))
	f.close()
	env.waitEnded(t, 1)

	// A client that goes away before the response.
	f = env.open(t, buffered)
	req = post(chat(10))
	req.headers["x-request-id"] = "req-cut"
	routed(t, f, req)
	f.abort()
	env.waitEnded(t, 1)

	// A rejection.
	f = env.open(t, buffered)
	req = post([]byte(`{"messages": [`))
	req.headers["x-request-id"] = "req-bad"
	if o, err := f.do(req); err != nil || o.immediate == nil {
		t.Fatalf("invalid JSON: %+v, %v", o, err)
	}
	f.close()
	env.waitEnded(t, 1)

	ends := map[string]map[string]any{}
	for _, msg := range []string{"request", "request cut"} {
		for _, m := range lines.with(t, msg) {
			ends[m["request_id"].(string)] = m
		}
	}
	if len(ends) != 3 {
		t.Fatalf("%d end lines, want 3: %v", len(ends), ends)
	}
	ok := ends["req-ok"]
	for k, want := range map[string]any{"level": "INFO", "msg": "request", "path": "/v1/chat/completions", "api": "chat_completions",
		"model": "m", "host": out.headers[processor.DefaultDestinationHeader], "why": "least_load", "status": 200.0, "status_class": "2xx",
		"end": "response_end", "output_tokens": 3.0} {
		if ok[k] != want {
			t.Errorf("success line: %s = %v, want %v (%v)", k, ok[k], want, ok)
		}
	}
	if d, _ := ok["duration_seconds"].(float64); d <= 0 || d > 60 {
		t.Errorf("duration_seconds %v", ok["duration_seconds"])
	}
	if n, _ := ok["prompt_tokens"].(float64); n < 100 {
		t.Errorf("prompt_tokens %v", ok["prompt_tokens"])
	}
	if m := ends["req-503"]; m["level"] != "WARN" || m["status"] != 503.0 || m["status_class"] != "5xx" {
		t.Errorf("503 line: %v", m)
	}
	if m := ends["req-cut"]; m["msg"] != "request cut" || m["end"] != "stream_end" || m["status_class"] != "none" {
		t.Errorf("cut line: %v", m)
	}
	rej := lines.with(t, "rejected")
	if len(rej) != 1 || rej[0]["level"] != "INFO" || rej[0]["reason"] != "invalid_json" || rej[0]["request_id"] != "req-bad" {
		t.Errorf("rejection lines: %v", rej)
	}
}

// TestRequestLogOff: LogRequests 0 logs no request lines, and rejections
// only at debug.
func TestRequestLogOff(t *testing.T) {
	lines := &logLines{}
	log := slog.New(slog.NewJSONHandler(lines, &slog.HandlerOptions{Level: slog.LevelInfo}))
	env := startEnv(t, threeHosts, picker.Options{}, Config{LogRequests: 0, Logger: log})
	f := env.open(t, buffered)
	routed(t, f, post(chat(10)))
	if err := f.respond("200"); err != nil {
		t.Fatal(err)
	}
	f.close()
	f = env.open(t, buffered)
	f.do(post([]byte(`[`)))
	f.close()
	env.waitEnded(t, 2)
	if n := len(lines.with(t, "request")) + len(lines.with(t, "rejected")); n != 0 {
		t.Fatalf("%d lines with logging off", n)
	}
}
