package backend

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenlb/tokenlb/picker"
)

func TestDiscoveryAndScrape(t *testing.T) {
	var models atomic.Value
	models.Store(`{"object":"list","data":[{"id":"llama","object":"model"},{"id":"llama-lora","object":"model"}]}`)
	page := `# HELP vllm:num_requests_running Requests in the running batch.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 7.0
vllm:num_requests_running{engine="1",model_name="llama"} 2.0
vllm:num_requests_waiting{engine="0",model_name="l{l}a \"m\" a"} 3.0
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.75
vllm:num_requests_running_total 99
`
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/models":
			fmt.Fprint(w, models.Load())
		case "/metrics":
			fmt.Fprint(w, page)
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	r := newRecorder()
	w, _ := New(r, []string{host}, Options{Models: Discovery{Interval: time.Hour}, Metrics: Scrape{Interval: time.Hour}}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { w.Run(ctx); close(done) }()
	<-r.told
	<-r.told
	cancel()
	<-done
	if got := strings.Join(r.models[host], ","); got != "llama,llama-lora" {
		t.Errorf("models %q", got)
	}
	rem := r.remote[host]
	if rem.Running != 9 || rem.Waiting != 3 || rem.KVCacheUsage != 0.75 || rem.At.IsZero() {
		t.Errorf("remote %+v, want 9 running, 3 waiting, 0.75 usage", rem)
	}
}

func TestParseMetrics(t *testing.T) {
	for _, tc := range []struct {
		name, page string
		want       picker.Remote
		found      bool
	}{
		{"sglang", "sglang:num_running_reqs{model_name=\"q\"} 4\nsglang:num_queue_reqs{model_name=\"q\"} 1\nsglang:token_usage 0.25\n",
			picker.Remote{Running: 4, Waiting: 1, KVCacheUsage: 0.25}, true},
		{"old vllm", "vllm:num_requests_running 1\nvllm:gpu_cache_usage_perc 0.9\n", picker.Remote{Running: 1, KVCacheUsage: 0.9}, true},
		{"nothing", "go_goroutines 12\n", picker.Remote{}, false},
		{"garbage", "vllm:num_requests_running{\nvllm:num_requests_waiting NaN\nvllm:num_requests_waiting -3\nvllm:num_requests_waiting 2 1700000000\n",
			picker.Remote{Waiting: 2}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, found, err := parseMetrics(strings.NewReader(tc.page))
			if err != nil || got != tc.want || found != tc.found {
				t.Fatalf("parseMetrics = %+v, %v, %v; want %+v, %v", got, found, err, tc.want, tc.found)
			}
		})
	}
}

func TestFailedReads(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, `{"not":"a list"}`)
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	r := newRecorder()
	w, _ := New(r, []string{host}, Options{Models: Discovery{Interval: time.Hour}, Metrics: Scrape{Interval: time.Hour}}, nil)
	w.discover(context.Background(), host)
	w.scrape(context.Background(), host)
	// A bad model list leaves the models as they were (not known: any
	// model); a bad metrics page forgets the last report.
	if _, told := r.models[host]; told {
		t.Errorf("a bad model list was passed on: %v", r.models[host])
	}
	if rem, told := r.remote[host]; !told || !rem.At.IsZero() {
		t.Errorf("a bad metrics page left %+v", rem)
	}
}

// TestModelsReadWhenHostRecovers: an engine that was loading (failing its
// health checks and its model list) is asked for its models as soon as it
// passes its checks, not a discovery interval later.
func TestModelsReadWhenHostRecovers(t *testing.T) {
	var up atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !up.Load() {
			w.WriteHeader(503)
			return
		}
		if r.URL.Path == "/v1/models" {
			fmt.Fprint(w, `{"data":[{"id":"llama"}]}`)
		}
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	r := newRecorder()
	w, _ := New(r, []string{host}, Options{Health: HealthCheck{Interval: 5 * time.Millisecond, UnhealthyThreshold: 1, HealthyThreshold: 1},
		Models: Discovery{Interval: time.Hour}}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { w.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	<-w.Ready()
	r.await(t, "the host down", func(got string) bool { return got == "health "+host && r.healthOf(host).Down })
	up.Store(true)
	r.await(t, "the models read", func(got string) bool { return got == "models "+host })
	r.mu.Lock()
	defer r.mu.Unlock()
	if m := r.models[host]; len(m) != 1 || m[0] != "llama" {
		t.Fatalf("models %v", m)
	}
}
