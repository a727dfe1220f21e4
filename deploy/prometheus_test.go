package deploy

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestAlertRules: prometheus/alerts.yaml passes promtool's check and its
// unit tests (prometheus/alerts_test.yaml), each alert firing when it
// should and not before. PROMETHEUS_DIR is scripts/prometheus.sh's folder;
// make test sets it.
func TestAlertRules(t *testing.T) {
	promtool := filepath.Join(tool(t, "PROMETHEUS_DIR", "prometheus.sh", "the alert rules"), "promtool")
	for _, args := range [][]string{{"check", "rules", "alerts.yaml"}, {"test", "rules", "alerts_test.yaml"}} {
		cmd := exec.Command(promtool, args...)
		cmd.Dir = "prometheus"
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "SUCCESS") {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}
