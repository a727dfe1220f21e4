// Command tokenlb is an Envoy ext_proc server that routes each LLM request to
// the backend whose load, in expected work, is lowest once the request is
// added (see package route).
//
//	tokenlb --config deploy/tokenlb.yaml
//
// See deploy/tokenlb.yaml for every setting and tokenlb --help for flags.
// main only wires: config.Load, then build (every part, from the
// configuration), then run (serve until a signal, then drain).
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"reflect"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/klog/v2"

	"github.com/tokenlb/tokenlb/admin"
	"github.com/tokenlb/tokenlb/backend"
	"github.com/tokenlb/tokenlb/config"
	"github.com/tokenlb/tokenlb/cost"
	"github.com/tokenlb/tokenlb/discovery"
	"github.com/tokenlb/tokenlb/picker"
	"github.com/tokenlb/tokenlb/processor"
	"github.com/tokenlb/tokenlb/route"
	"github.com/tokenlb/tokenlb/tlsreload"
	"github.com/tokenlb/tokenlb/tokenizer"
)

func main() {
	cfg, err := config.Load("tokenlb", os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "tokenlb:", err)
		os.Exit(2)
	}
	log := newLogger(cfg)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := listenAndRun(ctx, cfg, os.Args[1:], log); err != nil {
		log.Error("tokenlb stopped", "err", err)
		os.Exit(1)
	}
}

func newLogger(cfg config.Config) *slog.Logger {
	var level slog.Level
	level.UnmarshalText([]byte(cfg.LogLevel)) // validated by config
	opts := &slog.HandlerOptions{Level: level}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts))
}

func listenAndRun(ctx context.Context, cfg config.Config, args []string, log *slog.Logger) error {
	first, src, err := firstHosts(ctx, &cfg, log)
	if err != nil {
		return err
	}
	a, err := build(cfg, log)
	if err != nil {
		return err
	}
	a.args, a.kubernetes, a.initial = args, src, first
	a.setOrigins(first)
	grpcLis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	adminLis, err := net.Listen("tcp", cfg.Admin)
	if err != nil {
		grpcLis.Close()
		return fmt.Errorf("admin: %w", err)
	}
	return a.run(ctx, grpcLis, adminLis)
}

// app is tokenlb built from its configuration, ready to run.
type app struct {
	cfg             config.Config
	log             *slog.Logger
	picker          *picker.Picker
	watcher         *backend.Watcher
	grpcServer      *grpc.Server
	processor       *processor.Server
	healthServer    *health.Server
	adminServer     *http.Server
	estimator       *cost.Estimator
	state           atomic.Int32          // starting, ready, stopping
	readiness       sync.Mutex            // orders the readiness changes of becomeReady and shutdown
	args            []string              // the command line, read again with the file on a reload
	kubernetes      *discovery.Kubernetes // the kubernetes source, started by firstHosts
	initial         []discovery.Endpoint  // the hosts as first found (Source.Run's initial set)
	discoveryErrors *prometheus.CounterVec
}

const (
	starting int32 = iota
	ready
	stopping
)

// build makes every part of tokenlb from cfg and wires them together.
func build(cfg config.Config, log *slog.Logger) (*app, error) {
	a := &app{cfg: cfg, log: log}
	tok, err := tokenizer.New(cfg.Tokenizer.Options(cfg.Encoding))
	if err != nil {
		return nil, err
	}
	if a.picker, err = picker.New(cfg.HostAddresses(), cfg.PickerOptions()); err != nil {
		return nil, err
	}
	for _, h := range cfg.Hosts {
		if len(h.Models) > 0 {
			if err := a.picker.SetModels(h.Address, h.Models); err != nil {
				return nil, err
			}
		}
	}
	wopts := cfg.Watch()
	wopts.Logger = log
	watchMetrics := backend.NewMetrics()
	if a.watcher, err = backend.New(a.picker, cfg.HostAddresses(), wopts, watchMetrics); err != nil {
		return nil, err
	}
	est := cost.New(cfg.Cost.Options())
	a.estimator = est
	a.discoveryErrors = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenlb_discovery_errors_total",
		Help: "Host discovery that failed and left the running hosts in place, by source: a configuration file that does not load (static), a name that does not resolve to an address (dns), a pool or Service without a ready endpoint (kubernetes)."},
		[]string{"source"})
	rc := cfg.Route()
	rc.Picker, rc.Tokenizer, rc.Cost, rc.ResponseStatus, rc.Logger = a.picker, tok, est, a.watcher.Observe, log
	rc.Metrics = route.NewMetrics()
	pc := cfg.Processor()
	pc.Logger, pc.Metrics = log, processor.NewMetrics()
	pc.Metrics.ExpectRejections(route.Reasons...)
	a.processor = processor.New(route.New(rc), pc)

	reg := prometheus.NewRegistry()
	reg.MustRegister(a.picker.Collector(route.Causes...), tok.Collector(), collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	reg.MustRegister(pc.Metrics.Collectors()...)
	reg.MustRegister(rc.Metrics.Collectors()...)
	reg.MustRegister(watchMetrics.Collectors()...)
	reg.MustRegister(a.discoveryErrors, admin.BuildInfo())

	grpcOpts, err := listenerSecurity(cfg, log)
	if err != nil {
		return nil, err
	}
	a.grpcServer = grpc.NewServer(append(processor.GRPCServerOptions(cfg.MaxBodyBytes), grpcOpts...)...)
	extprocv3.RegisterExternalProcessorServer(a.grpcServer, a.processor)
	a.healthServer = health.NewServer()
	healthpb.RegisterHealthServer(a.grpcServer, a.healthServer)
	// The Endpoint Picker Protocol's names: liveness (the process
	// answers), readiness (it routes), and the ext_proc service itself,
	// which Envoy's health check asks for.
	a.healthServer.SetServingStatus("liveness", healthpb.HealthCheckResponse_SERVING)
	a.setReadiness(healthpb.HealthCheckResponse_NOT_SERVING)
	isReady := func() bool { return a.state.Load() == ready }
	a.adminServer = admin.NewServer(admin.Handler(a.picker, est, reg, isReady, admin.Options{Pprof: cfg.AdminPprof}), admin.DefaultTimeouts())
	return a, nil
}

// listenerSecurity returns the gRPC server options of the ext_proc
// listener's TLS, if any, and warns when whoever reaches a listener that is
// not loopback can use it.
func listenerSecurity(cfg config.Config, log *slog.Logger) ([]grpc.ServerOption, error) {
	ap, err := netip.ParseAddrPort(cfg.Listen)
	exposed := err == nil && !ap.Addr().IsLoopback()
	t := cfg.TLS
	if !t.Enabled() {
		if exposed {
			log.Warn("the ext_proc listener is PLAINTEXT on an address other machines can reach (tls.allow_plaintext): "+
				"whoever reaches it can steer traffic and eject hosts", "listen", cfg.Listen)
		}
		return nil, nil
	}
	var tlsCfg *tls.Config
	if t.SelfSigned {
		tlsCfg, err = tlsreload.SelfSigned()
	} else {
		tlsCfg, err = tlsreload.ServerConfig(tlsreload.Files{Cert: t.CertFile, Key: t.KeyFile, ClientCA: t.ClientCAFile}, log)
	}
	if err != nil {
		return nil, err
	}
	if exposed && t.ClientCAFile == "" {
		log.Warn("the ext_proc listener serves TLS without client certificates (no tls.client_ca_file): "+
			"any client that reaches it can steer traffic", "listen", cfg.Listen)
	}
	return []grpc.ServerOption{grpc.Creds(credentials.NewTLS(tlsCfg))}, nil
}

// readyWait bounds how long tokenlb waits for its first look at the
// backends before it reports ready.
const readyWait = 5 * time.Second

// run serves on the given listeners until ctx is done, then shuts down
// (see shutdown).
func (a *app) run(ctx context.Context, grpcLis, adminLis net.Listener) error {
	stopSweeper := make(chan struct{})
	defer close(stopSweeper)
	go a.picker.RunSweeper(stopSweeper, a.cfg.SweepInterval, a.cfg.LeaseTTL)
	watchCtx, stopWatching := context.WithCancel(context.Background())
	watched := make(chan struct{})
	go func() { a.watcher.Run(watchCtx); close(watched) }()
	defer func() { stopWatching(); <-watched }()
	go a.becomeReady(watchCtx)
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	if src := a.source(hup); src != nil {
		go src.Run(watchCtx, a.initial, a.setHosts)
	}

	errc := make(chan error, 2)
	go func() { errc <- a.grpcServer.Serve(grpcLis) }()
	go func() { errc <- a.adminServer.Serve(adminLis) }()
	a.log.Info("tokenlb serving", "ext_proc", grpcLis.Addr().String(), "admin", adminLis.Addr().String(),
		"hosts", a.cfg.HostAddresses(), "encoding", a.cfg.Encoding, "tokenizer", a.cfg.Tokenizer.Engine,
		"destination_header", a.cfg.DestinationHeader)

	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-errc:
	}
	serveErr = a.shutdown(serveErr, errc)
	if serveErr != nil && !errors.Is(serveErr, http.ErrServerClosed) && !errors.Is(serveErr, grpc.ErrServerStopped) {
		return serveErr
	}
	a.log.Info("tokenlb stopped")
	return nil
}

// source returns where the hosts come from as they change: the
// configuration file (read again on reload), the DNS, the Kubernetes API,
// or nothing (no file).
func (a *app) source(reload <-chan os.Signal) discovery.Source {
	d := a.cfg.Discovery
	switch d.Source {
	case "dns":
		return &discovery.DNS{Name: d.DNS.Name, Interval: d.DNS.Interval, Server: d.DNS.Server, Logger: a.log,
			Errors: a.discoveryErrors.WithLabelValues("dns")}
	case "kubernetes":
		a.kubernetes.Errors = a.discoveryErrors.WithLabelValues("kubernetes")
		return a.kubernetes
	}
	if path := config.FilePath(a.args); path != "" {
		return &discovery.File{Path: path, Load: a.loadHosts, Reload: reload, Logger: a.log,
			Errors: a.discoveryErrors.WithLabelValues("static")}
	}
	return nil
}

// firstHosts fills cfg's hosts from their source when that is not the
// file, waiting for a first set with an endpoint (or ctx): a DNS answer
// with an address, or a ready endpoint of the pool or Service, whose
// informers it starts (they run until ctx ends) and returns. It returns
// the hosts with where each came from.
func firstHosts(ctx context.Context, cfg *config.Config, log *slog.Logger) ([]discovery.Endpoint, *discovery.Kubernetes, error) {
	d := cfg.Discovery
	var eps []discovery.Endpoint
	var k8s *discovery.Kubernetes
	switch d.Source {
	case "static":
		return endpoints(cfg.Hosts), nil, nil
	case "dns":
		src := &discovery.DNS{Name: d.DNS.Name, Server: d.DNS.Server}
		for {
			var err error
			if eps, err = src.Resolve(ctx); err == nil {
				break
			}
			log.Warn("waiting for the hosts' DNS name to resolve", "name", d.DNS.Name, "err", err)
			select {
			case <-ctx.Done():
				return nil, nil, fmt.Errorf("discovery.dns: %w", err)
			case <-time.After(d.DNS.Interval):
			}
		}
	case "kubernetes":
		var err error
		if k8s, err = newKubernetes(d.Kubernetes, log); err != nil {
			return nil, nil, err
		}
		log.Info("waiting for the endpoints' first list", "source", k8s.Name())
		if eps, err = k8s.Start(ctx); err != nil {
			return nil, nil, err
		}
	}
	for _, e := range eps {
		cfg.Hosts = append(cfg.Hosts, config.Host{Address: e.Address})
	}
	return eps, k8s, nil
}

// newKubernetes makes the kubernetes source's clients from its setting.
func newKubernetes(k config.Kubernetes, log *slog.Logger) (*discovery.Kubernetes, error) {
	rc, ns, err := discovery.KubernetesConfig(k.Kubeconfig)
	if err != nil {
		return nil, err
	}
	if k.Namespace != "" {
		ns = k.Namespace
	}
	rc.UserAgent = "tokenlb"
	klog.SetSlogLogger(log.With("component", "client-go")) // client-go's own lines, in tokenlb's format
	client, err := dynamic.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("discovery.kubernetes: %w", err)
	}
	return &discovery.Kubernetes{Client: client, Namespace: ns,
		InferencePool: k.InferencePool, Service: k.Service, Port: k.Port, Logger: log}, nil
}

// loadHosts reads the command line and its configuration file again and
// returns the hosts; settings other than the hosts take effect only at the
// next start, which it says when they changed.
func (a *app) loadHosts() ([]discovery.Endpoint, error) {
	cfg, err := config.Load("tokenlb", a.args, io.Discard)
	if err != nil {
		return nil, err
	}
	next, running := cfg, a.cfg
	next.Hosts, running.Hosts = nil, nil
	if !reflect.DeepEqual(next, running) {
		a.log.Warn("the configuration changed beyond its hosts: those changes take effect at the next start")
	}
	return endpoints(cfg.Hosts), nil
}

func endpoints(hosts []config.Host) []discovery.Endpoint {
	out := make([]discovery.Endpoint, len(hosts))
	for i, h := range hosts {
		out[i] = discovery.Endpoint{Address: h.Address, Models: h.Models, Source: "static"}
	}
	return out
}

// setOrigins records where each endpoint came from, for /debug/hosts.
func (a *app) setOrigins(eps []discovery.Endpoint) {
	for _, e := range eps {
		a.picker.SetOrigin(e.Address, picker.Origin{Source: e.Source, Namespace: e.Namespace, Pod: e.Pod})
	}
}

// setHosts makes eps the fleet: the picker routes over them at once, the
// watcher follows them, and what was learned of removed hosts goes.
func (a *app) setHosts(eps []discovery.Endpoint) {
	addrs := make([]string, len(eps))
	for i, e := range eps {
		addrs[i] = e.Address
	}
	added, removed, err := a.picker.SetHosts(addrs)
	if err != nil {
		a.discoveryErrors.WithLabelValues(a.cfg.Discovery.Source).Inc()
		a.log.Error("hosts not changed", "err", err)
		return
	}
	a.setOrigins(eps)
	var configured []string
	for _, e := range eps {
		if len(e.Models) > 0 {
			a.picker.SetModels(e.Address, e.Models) // known to the picker: just set
			configured = append(configured, e.Address)
		}
	}
	if err := a.watcher.SetHosts(addrs, configured); err != nil {
		a.log.Error("backend watcher does not follow the hosts", "err", err) // the picker took them: cannot happen
	}
	for _, r := range removed {
		a.estimator.Forget(r)
	}
	a.log.Info("hosts changed", "added", added, "removed", removed, "hosts", addrs)
}

// setReadiness sets the gRPC health of readiness, of the ext_proc service
// and of the server as a whole ("").
func (a *app) setReadiness(st healthpb.HealthCheckResponse_ServingStatus) {
	for _, name := range []string{"readiness", extprocv3.ExternalProcessor_ServiceDesc.ServiceName, ""} {
		a.healthServer.SetServingStatus(name, st)
	}
}

// becomeReady reports ready once the watcher has checked every host and
// read its models (each bounded by its timeout), or after readyWait
// whatever it knows.
func (a *app) becomeReady(ctx context.Context) {
	select {
	case <-a.watcher.Ready():
	case <-time.After(readyWait):
		a.log.Warn("backends not all checked yet; serving anyway", "waited", readyWait)
	case <-ctx.Done():
		return
	}
	// Serving first, so that /readyz never says ready before the gRPC
	// health does; not at all once a shutdown began.
	a.readiness.Lock()
	defer a.readiness.Unlock()
	if a.state.Load() == starting {
		a.setReadiness(healthpb.HealthCheckResponse_SERVING)
		a.state.Store(ready)
	}
}

// shutdown reports not ready, waits ShutdownDelay (unless a server already
// failed) so that Envoy's health checks move new streams to other
// replicas, then drains: for the first half of DrainTimeout it serves every
// stream, new ones too, until no request is being routed; if some still
// are, it refuses new ones (Envoy answers 503, or routes by its own policy
// with failure_mode_allow) and gives those in flight the second half. Then
// it closes the listener and every connection. With the observer filter
// (both deploy configs) a response outlives its routing stream, which ends
// at its response headers, so what the close cuts is observer streams,
// which Envoy never waits for, and requests whose headers have not come
// back by then. It returns the first server error.
func (a *app) shutdown(serveErr error, errc <-chan error) error {
	a.log.Info("shutting down", "shutdown_delay", a.cfg.ShutdownDelay, "drain_timeout", a.cfg.DrainTimeout)
	// Envoy's health check stops sending streams; liveness stays SERVING
	// while the process drains.
	a.readiness.Lock()
	a.state.Store(stopping)
	a.setReadiness(healthpb.HealthCheckResponse_NOT_SERVING)
	a.readiness.Unlock()
	if serveErr == nil {
		select {
		case <-time.After(a.cfg.ShutdownDelay):
		case serveErr = <-errc:
		}
	}
	if err := drain(a.processor, a.cfg.DrainTimeout); err != nil {
		a.log.Warn("drain timeout: closing the remaining streams", "err", err, "open_leases", a.picker.Stats().OpenLeases)
	}
	a.grpcServer.Stop()
	stopGracefully(adminShutdownTimeout,
		func() { a.adminServer.Shutdown(context.Background()) }, func() { a.adminServer.Close() })
	return serveErr
}

// drain serves until no routing stream is open, for half of timeout; then
// refuses new streams and waits the other half for those open.
func drain(p *processor.Server, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout/2)
	defer cancel()
	if p.Drain(ctx) == nil {
		return nil
	}
	p.Refuse()
	ctx, cancel = context.WithTimeout(context.Background(), timeout-timeout/2)
	defer cancel()
	return p.Drain(ctx)
}

// adminShutdownTimeout bounds how long the admin server waits for its
// requests in flight.
const adminShutdownTimeout = 5 * time.Second

// stopGracefully runs graceful, and force once timeout has passed without
// graceful returning, then waits for graceful to return.
func stopGracefully(timeout time.Duration, graceful, force func()) {
	done := make(chan struct{})
	go func() { graceful(); close(done) }()
	select {
	case <-done:
	case <-time.After(timeout):
		force()
		<-done
	}
}
