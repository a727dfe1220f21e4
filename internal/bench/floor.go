package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/tokenlb/tokenlb/internal/proc"
	"github.com/tokenlb/tokenlb/processor"
)

// The floor is the overhead measurement's third arm: an ext_proc gRPC
// server that does as little as anything behind deploy/envoy.yaml can and
// still route. It is bench tooling, not product code: what the ext_proc
// protocol, gRPC and Envoy cost before tokenlb does any work of its own.
//
// On the routing filter's stream it answers the request headers by setting
// the destination header (the backends in turn: round robin), the request
// body and trailers with an empty reply, and the response headers with an
// empty reply, after which it ends the stream, as tokenlb does when an
// observer follows the response (proto-notes.md, "Who ends the routing
// stream"). The observer and end filters' streams (observability mode:
// Envoy never waits for an answer) it reads and answers nothing, as tokenlb
// does; it ends the observer's at the first body chunk, as tokenlb does for
// a response it does not follow to its end.

// FloorFlag is the hidden first argument that makes tokenlb-bench serve the
// floor instead: tokenlb-bench --floor-server ADDR HOST,HOST,... The
// overhead measurement starts the floor that way, in a process of its own,
// so that its CPU time is counted apart from the load generator's.
const FloorFlag = "--floor-server"

// destinationHeader is the header deploy/envoy.yaml's ORIGINAL_DST cluster
// connects by.
const destinationHeader = "x-gateway-destination-endpoint"

// floor is the do-nothing ext_proc server.
type floor struct {
	extprocv3.UnimplementedExternalProcessorServer
	hosts []string
	next  atomic.Uint64
}

// Process answers one ext_proc stream.
func (f *floor) Process(s extprocv3.ExternalProcessor_ProcessServer) error {
	for {
		req, err := s.Recv()
		if err != nil {
			if err == io.EOF || status.Code(err) == codes.Canceled || s.Context().Err() != nil {
				return nil
			}
			return err
		}
		if req.GetObservabilityMode() {
			// Envoy ignores any answer. The observer's stream ends at the
			// first body chunk, as tokenlb's does for a response it does
			// not follow; the end filter's is read to its close.
			if req.GetResponseBody() != nil {
				return nil
			}
			continue
		}
		resp, last := f.reply(req)
		if resp == nil {
			continue
		}
		if err := s.Send(resp); err != nil {
			return err
		}
		if last {
			return nil
		}
	}
}

// reply is the least valid answer to req, and whether the stream can end
// after it (the response headers: nothing more is asked of the routing
// filter in deploy/envoy.yaml).
func (f *floor) reply(req *extprocv3.ProcessingRequest) (resp *extprocv3.ProcessingResponse, last bool) {
	switch req.Request.(type) {
	case *extprocv3.ProcessingRequest_RequestHeaders:
		host := f.hosts[(f.next.Add(1)-1)%uint64(len(f.hosts))]
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{
			RequestHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{
				HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{{
					Header:       &corev3.HeaderValue{Key: destinationHeader, RawValue: []byte(host)},
					AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
				}}}}}}}, false
	case *extprocv3.ProcessingRequest_RequestBody:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{
			RequestBody: &extprocv3.BodyResponse{}}}, false
	case *extprocv3.ProcessingRequest_RequestTrailers:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestTrailers{
			RequestTrailers: &extprocv3.TrailersResponse{}}}, false
	case *extprocv3.ProcessingRequest_ResponseHeaders:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{
			ResponseHeaders: &extprocv3.HeadersResponse{}}}, true
	case *extprocv3.ProcessingRequest_ResponseBody:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{
			ResponseBody: &extprocv3.BodyResponse{}}}, false
	case *extprocv3.ProcessingRequest_ResponseTrailers:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseTrailers{
			ResponseTrailers: &extprocv3.TrailersResponse{}}}, false
	}
	return nil, false
}

// newFloorServer returns a gRPC server with the floor's ext_proc service
// and the health service Envoy's cluster checks, serving. Its transport
// settings are tokenlb's own (processor.GRPCServerOptions: flow-control
// windows, stream workers), so that the two differ only in what they do
// with each message: with grpc-go's defaults the floor would pay for
// bandwidth-estimation PINGs and window updates that tokenlb does not.
func newFloorServer(hosts []string) *grpc.Server {
	srv := grpc.NewServer(processor.GRPCServerOptions(0)...)
	extprocv3.RegisterExternalProcessorServer(srv, &floor{hosts: hosts})
	h := health.NewServer()
	h.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	h.SetServingStatus("envoy.service.ext_proc.v3.ExternalProcessor", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(srv, h)
	return srv
}

// ServeFloor serves the floor on addr, routing to hosts in turn, until ctx
// ends.
func ServeFloor(ctx context.Context, addr string, hosts []string) error {
	if len(hosts) == 0 || hosts[0] == "" {
		return errors.New("bench: the floor server needs hosts")
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := newFloorServer(hosts)
	go func() { <-ctx.Done(); srv.Stop() }()
	err = srv.Serve(l)
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// startFloor starts the floor as a process of g named "floor" (this
// program again, with FloorFlag), routing to hosts, and returns its port
// once it accepts connections.
func startFloor(ctx context.Context, g *proc.Group, hosts []string) (int, error) {
	exe, err := os.Executable()
	if err != nil {
		return 0, err
	}
	port, err := proc.FreePort()
	if err != nil {
		return 0, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	if err := g.Start("floor", exe, FloorFlag, addr, strings.Join(hosts, ",")); err != nil {
		return 0, err
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		if err := g.Exited(); err != nil {
			return 0, err
		}
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			return port, nil
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("bench: the floor server did not listen on %s", addr)
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}
