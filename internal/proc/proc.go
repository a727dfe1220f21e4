// Package proc starts and stops the helper processes (Envoy, tokenlb,
// llmsim) that the demo and the benchmark run on loopback.
package proc

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/tokenlb/tokenlb/internal/envoycfg"
)

// Group is a set of started processes, logging into Dir.
type Group struct {
	Dir string

	mu      sync.Mutex
	procs   []*process
	started int // processes and configurations numbered so far, for file names
}

// next returns a fresh number for a file name.
func (g *Group) next() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.started++
	return g.started - 1
}

type process struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	log  string
}

// Start starts bin with args; its output goes to a log file in g.Dir.
func (g *Group) Start(name, bin string, args ...string) error {
	return g.StartEnv(name, bin, nil, args...)
}

// StartEnv starts bin with args and, besides this process's environment,
// env ("KEY=value" each); its output goes to a log file in g.Dir.
func (g *Group) StartEnv(name, bin string, env []string, args ...string) error {
	f, err := os.Create(filepath.Join(g.Dir, fmt.Sprintf("%s-%d.log", name, g.next())))
	if err != nil {
		return err
	}
	cmd := exec.Command(bin, args...)
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	cmd.Stdout, cmd.Stderr = f, f
	// Children die with their parent, even if it is killed, but not with a
	// Ctrl-C to the terminal's process group: the parent stops them itself.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		return fmt.Errorf("start %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, done: make(chan struct{}), log: f.Name()}
	go func() { cmd.Wait(); f.Close(); close(p.done) }()
	g.mu.Lock()
	g.procs = append(g.procs, p)
	g.mu.Unlock()
	return nil
}

// Exited reports a process that stopped on its own, with its last log lines.
func (g *Group) Exited() error {
	for _, p := range g.running() {
		select {
		case <-p.done:
			b, _ := os.ReadFile(p.log)
			lines := strings.Split(strings.TrimSpace(string(b)), "\n")
			return fmt.Errorf("%s exited unexpectedly:\n%s", p.name, strings.Join(lines[max(0, len(lines)-10):], "\n"))
		default:
		}
	}
	return nil
}

// PID returns the process id of the first process named name, or 0.
func (g *Group) PID(name string) int {
	for _, p := range g.running() {
		if p.name == name {
			return p.cmd.Process.Pid
		}
	}
	return 0
}

// Kill kills the first process named name at once, as a host dies, and
// waits for it; the group no longer counts it as running.
func (g *Group) Kill(name string) {
	g.mu.Lock()
	i := slices.IndexFunc(g.procs, func(p *process) bool { return p.name == name })
	var p *process
	if i >= 0 {
		p = g.procs[i]
		g.procs = slices.Delete(g.procs, i, i+1)
	}
	g.mu.Unlock()
	if p != nil {
		p.cmd.Process.Kill()
		<-p.done
	}
}

// running returns the processes started and not killed.
func (g *Group) running() []*process {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.procs)
}

// StopAll sends SIGTERM to every process and waits up to 5 s for each
// before killing it.
func (g *Group) StopAll() {
	procs := g.running()
	for _, p := range procs {
		p.cmd.Process.Signal(syscall.SIGTERM)
	}
	for _, p := range procs {
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
			p.cmd.Process.Kill()
			<-p.done
		}
	}
	g.mu.Lock()
	g.procs = nil
	g.mu.Unlock()
}

// WaitReady polls url until it answers 200, a process exits, ctx ends or
// 30 s pass.
func (g *Group) WaitReady(ctx context.Context, url string) error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if err := g.Exited(); err != nil {
			return err
		}
		if resp, err := (&http.Client{Timeout: 2 * time.Second}).Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return fmt.Errorf("%s not ready after 30s", url)
}

// FreePort returns a loopback port that was free a moment ago.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// FindEnvoy returns an Envoy 1.40 binary: $ENVOY_BIN, else whatever the
// repository's scripts/envoy.sh finds or installs. root is the repository.
func FindEnvoy(root string) (string, error) {
	if p := os.Getenv("ENVOY_BIN"); p != "" {
		return p, nil
	}
	cmd := exec.Command(filepath.Join(root, "scripts", "envoy.sh"))
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("scripts/envoy.sh: %w", err)
	}
	return strings.TrimSpace(string(out)), nil
}

// StartEnvoy renders the deploy configuration at path with o, filling in
// free ports for a zero ListenPort or AdminPort, starts Envoy on it with
// args added, and waits until its admin reports ready. It returns o with
// the ports used.
func (g *Group) StartEnvoy(ctx context.Context, bin, path string, o envoycfg.Options, args ...string) (envoycfg.Options, error) {
	for _, p := range []*int{&o.ListenPort, &o.AdminPort} {
		if *p == 0 {
			port, err := FreePort()
			if err != nil {
				return o, err
			}
			*p = port
		}
	}
	cfg, err := envoycfg.Render(path, o)
	if err != nil {
		return o, err
	}
	cfgPath := filepath.Join(g.Dir, fmt.Sprintf("envoy-%d.yaml", g.next()))
	if err := os.WriteFile(cfgPath, cfg, 0o600); err != nil {
		return o, err
	}
	if err := g.Start("envoy", bin, append([]string{"-c", cfgPath, "--disable-hot-restart"}, args...)...); err != nil {
		return o, err
	}
	return o, g.WaitReady(ctx, fmt.Sprintf("http://127.0.0.1:%d/ready", o.AdminPort))
}

// Build compiles the repository's packages pkgs (./cmd/tokenlb, …) into
// outDir, for tests that run the real binaries. root is the repository.
func Build(root, outDir string, pkgs ...string) error {
	cmd := exec.Command("go", append([]string{"build", "-o", outDir + string(filepath.Separator)}, pkgs...)...)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %v: %w\n%s", pkgs, err, out)
	}
	return nil
}
