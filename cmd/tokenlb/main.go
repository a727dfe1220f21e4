// Command tokenlb is an Envoy ext_proc server that routes each LLM request to
// the backend with the fewest in-flight prompt tokens.
//
//	tokenlb --config deploy/tokenlb.yaml
//
// See deploy/tokenlb.yaml for every setting and tokenlb --help for flags.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/tokenlb/tokenlb/admin"
	"github.com/tokenlb/tokenlb/backend"
	"github.com/tokenlb/tokenlb/config"
	"github.com/tokenlb/tokenlb/cost"
	"github.com/tokenlb/tokenlb/picker"
	"github.com/tokenlb/tokenlb/processor"
	"github.com/tokenlb/tokenlb/tokenizer"
)

func main() {
	cfg, err := config.FromArgs("tokenlb", os.Args[1:], os.Stderr)
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
	if err := listenAndServe(ctx, cfg, log); err != nil {
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

func listenAndServe(ctx context.Context, cfg config.Config, log *slog.Logger) error {
	grpcLis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	adminLis, err := net.Listen("tcp", cfg.Admin)
	if err != nil {
		grpcLis.Close()
		return fmt.Errorf("admin: %w", err)
	}
	return serve(ctx, cfg, log, grpcLis, adminLis)
}

// readyWait bounds how long tokenlb waits for its first look at the
// backends before it reports ready.
const readyWait = 5 * time.Second

// serve runs tokenlb on the given listeners until ctx is done, then shuts
// down: not ready, wait ShutdownDelay, stop accepting streams, drain the
// in-flight ones for up to DrainTimeout.
func serve(ctx context.Context, cfg config.Config, log *slog.Logger, grpcLis, adminLis net.Listener) error {
	tok, err := tokenizer.New(cfg.Tokenizer.Options(cfg.Encoding, cfg.PrefixAffinity))
	if err != nil {
		return err
	}
	p, err := picker.New(cfg.HostAddresses(), picker.Options{MaxInFlightTokens: cfg.MaxInFlightTokensPerHost, Tolerance: picker.DefaultTolerance,
		StallWeight: cfg.Cost.StallWeight, Affinity: cfg.Affinity(),
		// Hosts whose models are never asked for serve any model.
		UnknownServesAny: cfg.Models.DiscoveryInterval == 0})
	if err != nil {
		return err
	}
	for _, h := range cfg.Hosts {
		if len(h.Models) > 0 {
			p.SetModels(h.Address, h.Models)
		}
	}
	wopts := cfg.Watch()
	wopts.Logger = log
	watchMetrics := backend.NewMetrics()
	watcher, err := backend.New(p, cfg.HostAddresses(), wopts, watchMetrics)
	if err != nil {
		return err
	}
	metrics := processor.NewMetrics()
	reg := prometheus.NewRegistry()
	reg.MustRegister(p.Collector(), tok.Collector(), collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	reg.MustRegister(metrics.Collectors()...)
	reg.MustRegister(watchMetrics.Collectors()...)

	model := cost.New(cfg.Cost.Options())
	srv := processor.New(p, tok, processor.Config{
		DestinationHeader:  cfg.DestinationHeader,
		MaxBodyBytes:       cfg.MaxBodyBytes,
		RetryAfter:         cfg.RetryAfter,
		Fallbacks:          cfg.FallbackHosts,
		Cost:               model,
		Observer:           cfg.Response.Observer,
		LeaseHeader:        cfg.Response.LeaseHeader,
		ObserverGrace:      cfg.Response.ObserverGrace,
		EstimateFirstToken: cfg.Response.EstimateFirstToken,
		ModelRouting:       cfg.Models.Routing,
		ResponseStatus:     watcher.Observe,
		Logger:             log,
		Metrics:            metrics,
	})
	gs := grpc.NewServer(processor.GRPCServerOptions(cfg.MaxBodyBytes)...)
	extprocv3.RegisterExternalProcessorServer(gs, srv)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(gs, hs)
	hs.SetServingStatus(extprocv3.ExternalProcessor_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_NOT_SERVING)

	// Ready once the watcher has checked every host and read its models
	// (each bounded by its timeout), or after readyWait whatever it knows.
	var state atomic.Int32 // starting, ready, stopping
	const (
		starting int32 = iota
		ready
		stopping
	)
	isReady := func() bool { return state.Load() == ready }
	adminSrv := &http.Server{Handler: admin.Handler(p, model, reg, isReady), ReadHeaderTimeout: 10 * time.Second}

	stopSweeper := make(chan struct{})
	defer close(stopSweeper)
	go p.RunSweeper(stopSweeper, cfg.SweepInterval, cfg.LeaseTTL)
	watchCtx, stopWatching := context.WithCancel(context.Background())
	watched := make(chan struct{})
	go func() { watcher.Run(watchCtx); close(watched) }()
	defer func() { stopWatching(); <-watched }()
	go func() {
		select {
		case <-watcher.Ready():
		case <-time.After(readyWait):
			log.Warn("backends not all checked yet; serving anyway", "waited", readyWait)
		case <-watchCtx.Done():
			return
		}
		// Serving first, so that /readyz never says ready before the gRPC
		// health does; after a shutdown began, Shutdown overrides it.
		hs.SetServingStatus(extprocv3.ExternalProcessor_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
		state.CompareAndSwap(starting, ready)
	}()

	errc := make(chan error, 2)
	go func() { errc <- gs.Serve(grpcLis) }()
	go func() { errc <- adminSrv.Serve(adminLis) }()
	log.Info("tokenlb serving", "ext_proc", grpcLis.Addr().String(), "admin", adminLis.Addr().String(),
		"hosts", cfg.HostAddresses(), "encoding", cfg.Encoding, "tokenizer", cfg.Tokenizer.Engine, "destination_header", cfg.DestinationHeader)

	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-errc:
	}

	log.Info("shutting down", "shutdown_delay", cfg.ShutdownDelay, "drain_timeout", cfg.DrainTimeout)
	state.Store(stopping)
	hs.Shutdown() // every service NOT_SERVING: Envoy's health check stops sending streams
	if serveErr == nil {
		select {
		case <-time.After(cfg.ShutdownDelay):
		case serveErr = <-errc:
		}
	}
	drained := make(chan struct{})
	go func() { gs.GracefulStop(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(cfg.DrainTimeout):
		log.Warn("drain timeout: closing the remaining streams", "open_leases", p.Stats().OpenLeases)
		gs.Stop()
		<-drained
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	adminSrv.Shutdown(shutdownCtx)
	if serveErr != nil && !errors.Is(serveErr, http.ErrServerClosed) && !errors.Is(serveErr, grpc.ErrServerStopped) {
		return serveErr
	}
	log.Info("tokenlb stopped")
	return nil
}
