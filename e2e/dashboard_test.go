package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// prometheusDir is the folder of Prometheus' binaries (scripts/prometheus.sh,
// which make test passes as PROMETHEUS_DIR); without it the tests that
// need them skip, or fail under CI.
func prometheusDir(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("PROMETHEUS_DIR")
	if dir == "" {
		if os.Getenv("CI") == "true" {
			t.Fatal("PROMETHEUS_DIR is not set: CI must run the dashboard and alert tests (make test sets it)")
		}
		t.Skip("PROMETHEUS_DIR is not set; run scripts/prometheus.sh")
	}
	return dir
}

// TestDashboardAndAlerts: a real Prometheus scrapes a running tokenlb while
// requests flow through Envoy to llmsim, with deploy/prometheus/alerts.yaml
// loaded; every rule evaluates without error, and every query of
// deploy/grafana/tokenlb.json parses and returns data.
func TestDashboardAndAlerts(t *testing.T) {
	dir := prometheusDir(t)
	s := startSimStack(t)

	// Traffic for the whole test: streamed chats, and a bad request now
	// and then for the rejections.
	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { stop(); wg.Wait() }()
	wg.Go(func() {
		for i := 0; ctx.Err() == nil; i++ {
			body := []byte(fmt.Sprintf(`{"model":"llmsim","stream":true,"max_tokens":8,"stream_options":{"include_usage":true},`+
				`"messages":[{"role":"user","content":"request %d about load balancing"}]}`, i))
			if i%10 == 9 {
				body = []byte(`{"messages": [`)
			}
			req, _ := http.NewRequestWithContext(ctx, "POST", s.envoy.url("/v1/chat/completions"), bytes.NewReader(body))
			req.Header.Set("content-type", "application/json")
			if resp, err := http.DefaultClient.Do(req); err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		}
	})

	alerts, err := filepath.Abs(filepath.Join(repoRoot, "deploy", "prometheus", "alerts.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	config := filepath.Join(work, "prometheus.yaml")
	os.WriteFile(config, []byte(fmt.Sprintf("global: {scrape_interval: 1s, evaluation_interval: 1s}\nrule_files: [%q]\n"+
		"scrape_configs:\n- job_name: tokenlb\n  static_configs:\n  - targets: [\"127.0.0.1:%d\"]\n", alerts, s.tokenlb.adminPort)), 0o644)
	port := freePort(t)
	startProcess(t, filepath.Join(dir, "prometheus"), "--config.file="+config, "--storage.tsdb.path="+filepath.Join(work, "data"),
		fmt.Sprintf("--web.listen-address=127.0.0.1:%d", port))
	api := fmt.Sprintf("http://127.0.0.1:%d/api/v1/", port)

	// Enough scrapes for rates over them, and every rule evaluated.
	waitFor(t, 60*time.Second, "five scrapes of tokenlb", func() bool {
		r, err := query(api, `count_over_time(up{job="tokenlb"}[1m])`)
		if err != nil || len(r) != 1 {
			return false
		}
		n, _ := strconv.ParseFloat(r[0].Value[1].(string), 64)
		return n >= 5
	})
	var rules struct {
		Data struct {
			Groups []struct {
				Rules []struct {
					Name, Health, LastError string
				}
			}
		}
	}
	waitFor(t, 30*time.Second, "every rule evaluated", func() bool {
		if err := getJSON(api+"rules", &rules); err != nil || len(rules.Data.Groups) != 1 {
			return false
		}
		for _, r := range rules.Data.Groups[0].Rules {
			if r.Health != "ok" {
				return false
			}
		}
		return true
	})
	if n := len(rules.Data.Groups[0].Rules); n != 5 {
		t.Fatalf("%d rules loaded, want alerts.yaml's 5", n)
	}

	var dash struct {
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
	}
	b, err := os.ReadFile(filepath.Join(repoRoot, "deploy", "grafana", "tokenlb.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, p := range dash.Panels {
		for _, target := range p.Targets {
			n++
			r, err := query(api, target.Expr)
			if err != nil {
				t.Errorf("panel %q: %s: %v", p.Title, target.Expr, err)
			} else if len(r) == 0 {
				t.Errorf("panel %q: %s returned no data", p.Title, target.Expr)
			}
		}
	}
	if n < 12 {
		t.Fatalf("%d dashboard queries, want every panel's", n)
	}
}

// sample is one element of an instant query's vector.
type sample struct {
	Metric map[string]string
	Value  []any // [time, "value"]
}

// query runs an instant PromQL query against Prometheus' API at api.
func query(api, q string) ([]sample, error) {
	var out struct {
		Status, Error string
		Data          struct {
			ResultType string
			Result     json.RawMessage
		}
	}
	if err := getJSON(api+"query?query="+url.QueryEscape(q), &out); err != nil {
		return nil, err
	}
	if out.Status != "success" {
		return nil, fmt.Errorf("%s: %s", out.Status, out.Error)
	}
	if out.Data.ResultType == "scalar" {
		return []sample{{}}, nil
	}
	var r []sample
	err := json.Unmarshal(out.Data.Result, &r)
	return r, err
}

func getJSON(u string, v any) error {
	resp, err := http.Get(u)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s: %s", u, strings.TrimSpace(string(b)))
	}
	return nil
}
