package demo

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/tokenlb/tokenlb/internal/proc"
)

// TestRun runs a short demo against real binaries and checks what a user
// sees: three hosts receiving traffic, no errors, and every charge back to 0
// after the clients stop.
func TestRun(t *testing.T) {
	root, _ := filepath.Abs(filepath.Join("..", ".."))
	envoy, err := proc.FindEnvoy(root)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("no Envoy 1.40: %v", err)
		}
		t.Skipf("no Envoy 1.40 (%v); run make tools", err)
	}
	bin := t.TempDir()
	if err := proc.Build(root, bin, "./cmd/tokenlb", "./cmd/llmsim"); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	err = Run(context.Background(), Options{
		Envoy: envoy, Tokenlb: filepath.Join(bin, "tokenlb"), Llmsim: filepath.Join(bin, "llmsim"),
		Config: filepath.Join(root, "deploy", "envoy.yaml"), Duration: 4 * time.Second, Concurrency: 6, Seed: 1, Out: &out,
	})
	if err != nil {
		t.Fatalf("Run: %v\n%s", err, out.String())
	}
	s := out.String()
	final := s[strings.LastIndex(s, "every charge should now return to 0"):]
	hosts := regexp.MustCompile(`load +(\d+) ms +prefilling +(\d+) tokens +in flight +(\d+) tokens +(\d+) reqs +routed +(\d+)`).FindAllStringSubmatch(final, -1)
	if len(hosts) != 3 {
		t.Fatalf("final view shows %d hosts:\n%s", len(hosts), s)
	}
	for _, h := range hosts {
		if h[1] != "0" || h[2] != "0" || h[3] != "0" || h[4] != "0" || h[5] == "0" {
			t.Fatalf("final view: a host still charged or never used: %q\n%s", h[0], s)
		}
	}
	if !regexp.MustCompile(`done [1-9]\d* +errors 0 `).MatchString(final) {
		t.Fatalf("final view shows errors or no completed requests:\n%s", final)
	}
}
