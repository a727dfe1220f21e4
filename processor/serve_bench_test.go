package processor_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/tokenlb/tokenlb/picker"
	"github.com/tokenlb/tokenlb/processor"
	"github.com/tokenlb/tokenlb/route"
)

// BenchmarkServe measures what one routed request costs tokenlb's gRPC
// server, with grpc-go's default transport settings and with those of
// GRPCServerOptions, in the same run:
//
//	go test -run '^$' -bench BenchmarkServe -benchtime 3s -count 6 ./processor/
//
// (-count runs each arm 6 times in a row; on a busy machine, interleave
// them: go test -c, then run the binary 6 times with -test.count 1.)
//
// Each op is one ext_proc stream as Envoy opens it for a BUFFERED chat
// request of about 1,000 tokens: request_headers, the body, the response
// headers, end of stream; one or 16 streams per GOMAXPROCS at once (a quiet
// and a busy Envoy), multiplexed on one connection as Envoy does. Every
// body is different, so that the tokenizer's cache does not hide the
// counting.
//
// The server, the real processor and router (picker, tokenizer), runs in a
// process of its own (this test binary again, see TestServeHelper) on
// loopback, so that its CPU is measured apart from the client's:
// server-cpu-ns/op is its user and system CPU per request, client-cpu-ns/op
// the benchmark's, server-allocs/op and server-B/op its allocations;
// server-pings/op and server-window-updates/op are the PING and
// WINDOW_UPDATE frames it sends. TOKENLB_SERVE_PROFILE=dir writes the
// server's CPU profile of each arm to dir/arm.cpu. The client plays Envoy,
// whose HTTP/2 windows are static (256 MiB, Envoy's defaults), so it never
// sends BDP pings of its own.
//
// The arms: default (grpc-go's defaults and the receive limit), window
// (static flow-control windows) and tuned (GRPCServerOptions: the windows
// and stream workers).
func BenchmarkServe(b *testing.B) {
	for _, perProc := range []int{1, 16} {
		for _, arm := range []string{"default", "window", "tuned"} {
			b.Run(fmt.Sprintf("streams=%d/options=%s", perProc*runtime.GOMAXPROCS(0), arm), func(b *testing.B) {
				benchServe(b, arm, perProc)
			})
		}
	}
}

// serveArms are BenchmarkServe's server option sets.
func serveArms() map[string][]grpc.ServerOption {
	const maxBody = processor.DefaultMaxBodyBytes
	recvLimit := grpc.MaxRecvMsgSize(int(maxBody) + 1<<20)
	return map[string][]grpc.ServerOption{
		"default": {recvLimit},
		"window": {recvLimit, grpc.InitialWindowSize(processor.StreamWindowBytes),
			grpc.InitialConnWindowSize(processor.ConnWindowBytes)},
		"tuned": processor.GRPCServerOptions(maxBody),
	}
}

// serveHelperEnv names the arm TestServeHelper serves.
const serveHelperEnv = "TOKENLB_SERVE_HELPER"

// TestServeHelper is BenchmarkServe's server process: it serves one arm's
// options on loopback and prints "addr=" and the address; for each line
// "stats" on its stdin it prints "stats", its allocations and bytes
// allocated so far; it stops when its stdin closes, failing if any request
// is still charged.
func TestServeHelper(t *testing.T) {
	arm := os.Getenv(serveHelperEnv)
	if arm == "" {
		t.Skip("BenchmarkServe's server process")
	}
	opts, ok := serveArms()[arm]
	if !ok {
		t.Fatalf("no arm %q", arm)
	}
	p, err := picker.New(threeHosts, picker.Options{})
	if err != nil {
		t.Fatal(err)
	}
	router := route.New(route.Config{Picker: p, Tokenizer: testTokenizer(t), Metrics: route.NewMetrics()})
	srv := processor.New(router, processor.Config{Metrics: processor.NewMetrics()})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(opts...)
	extprocv3.RegisterExternalProcessorServer(gs, srv)
	go gs.Serve(lis)
	fmt.Printf("addr=%s\n", lis.Addr())
	for in := bufio.NewScanner(os.Stdin); in.Scan(); {
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		fmt.Printf("stats %d %d\n", ms.Mallocs, ms.TotalAlloc)
	}
	gs.Stop()
	if tokens, reqs := inFlightOf(p); tokens != 0 || reqs != 0 {
		t.Fatalf("%d tokens, %d requests still in flight", tokens, reqs)
	}
}

// benchText is about 1,000 tokens of varied prose (cl100k_base).
var benchText = func() string {
	words := strings.Fields(`the model server batches every request it runs and a long prompt
		holds the batch while it is prefilled so that the short ones queue behind it token
		aware balancing counts each prompt before it picks a host whose queued work is
		lowest once this request is added which round robin cannot see since a request is
		one request whatever its length`)
	var sb strings.Builder
	for i := 0; sb.Len() < 5200; i++ {
		sb.WriteString(words[(i*7+i/len(words))%len(words)])
		if i%13 == 12 {
			sb.WriteString(". ")
		} else {
			sb.WriteByte(' ')
		}
	}
	return sb.String()
}()

func benchServe(b *testing.B, arm string, perProc int) {
	args := []string{"-test.run=^TestServeHelper$", "-test.count=1"}
	if dir := os.Getenv("TOKENLB_SERVE_PROFILE"); dir != "" {
		// The server's CPU profile, one file per arm (the last run's).
		args = append(args, "-test.cpuprofile="+filepath.Join(dir, arm+".cpu"))
	}
	server := exec.Command(os.Args[0], args...)
	server.Env = append(os.Environ(), serveHelperEnv+"="+arm)
	server.Stderr = os.Stderr
	stdin, err := server.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := server.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := server.Start(); err != nil {
		b.Fatal(err)
	}
	var out strings.Builder
	lines := bufio.NewScanner(stdout)
	defer func() {
		stdin.Close()
		for lines.Scan() {
			out.WriteString(lines.Text() + "\n")
		}
		if err := server.Wait(); err != nil {
			b.Errorf("server process: %v\n%s", err, out.String())
		}
	}()
	var addr string
	for addr == "" && lines.Scan() {
		addr, _ = strings.CutPrefix(lines.Text(), "addr=")
	}
	if addr == "" {
		b.Fatal("server process printed no address")
	}
	// stats asks the server for its allocations and bytes allocated.
	stats := func() (allocs, bytes float64) {
		if _, err := io.WriteString(stdin, "stats\n"); err != nil {
			b.Fatal(err)
		}
		for lines.Scan() {
			if _, err := fmt.Sscanf(lines.Text(), "stats %g %g", &allocs, &bytes); err == nil {
				return allocs, bytes
			}
			out.WriteString(lines.Text() + "\n")
		}
		b.Fatalf("server process ended: %v\n%s", lines.Err(), out.String())
		return 0, 0
	}
	frames := new(frameCounts)
	dial := func(ctx context.Context, addr string) (net.Conn, error) {
		c, err := new(net.Dialer).DialContext(ctx, "tcp", addr)
		return &frameCounter{Conn: c, counts: frames}, err
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithContextDialer(dial),
		grpc.WithInitialWindowSize(256<<20), grpc.WithInitialConnWindowSize(256<<20))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	client := extprocv3.NewExternalProcessorClient(conn)
	var seq atomic.Int64
	// Connect and warm up.
	for range 100 {
		if err := serveOne(client, seq.Add(1)); err != nil {
			b.Fatal(err)
		}
	}

	b.ReportAllocs()
	b.SetParallelism(perProc)
	allocsBefore, bytesBefore := stats()
	pingsBefore, updatesBefore := frames[http2Ping].Load(), frames[http2WindowUpdate].Load()
	clientBefore, serverBefore := cpuTime(), processCPU(b, server.Process.Pid)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := serveOne(client, seq.Add(1)); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.StopTimer()
	b.ReportMetric(float64(processCPU(b, server.Process.Pid)-serverBefore)/float64(b.N), "server-cpu-ns/op")
	b.ReportMetric(float64(cpuTime()-clientBefore)/float64(b.N), "client-cpu-ns/op")
	b.ReportMetric(float64(frames[http2Ping].Load()-pingsBefore)/float64(b.N), "server-pings/op")
	b.ReportMetric(float64(frames[http2WindowUpdate].Load()-updatesBefore)/float64(b.N), "server-window-updates/op")
	allocs, bytes := stats()
	b.ReportMetric((allocs-allocsBefore)/float64(b.N), "server-allocs/op")
	b.ReportMetric((bytes-bytesBefore)/float64(b.N), "server-B/op")
}

// HTTP/2 frame types counted.
const (
	http2Ping         = 6
	http2WindowUpdate = 8
)

// frameCounts counts the HTTP/2 frames the server sends, by type.
type frameCounts [10]atomic.Int64

// frameCounter is the client's connection: it counts the frames it reads.
// grpc-go reads a connection from one goroutine.
type frameCounter struct {
	net.Conn
	counts *frameCounts
	header []byte // of the next frame, while incomplete
	skip   int    // payload bytes of the current frame still to come
}

func (c *frameCounter) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	for b := p[:n]; len(b) > 0; {
		if c.skip > 0 {
			k := min(c.skip, len(b))
			c.skip, b = c.skip-k, b[k:]
			continue
		}
		k := min(9-len(c.header), len(b))
		c.header, b = append(c.header, b[:k]...), b[k:]
		if len(c.header) == 9 {
			if t := c.header[3]; int(t) < len(c.counts) {
				c.counts[t].Add(1)
			}
			c.skip = int(c.header[0])<<16 | int(c.header[1])<<8 | int(c.header[2])
			c.header = c.header[:0]
		}
	}
	return n, err
}

// processCPU is the user and system CPU time process pid has used, from
// /proc/pid/stat (fields 14 and 15, in clock ticks of 10ms).
func processCPU(b *testing.B, pid int) time.Duration {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// Fields count from 3 after the command name, which is in parentheses.
	f := strings.Fields(string(raw[bytes.LastIndexByte(raw, ')')+1:]))
	utime, err1 := strconv.ParseInt(f[14-3], 10, 64)
	stime, err2 := strconv.ParseInt(f[15-3], 10, 64)
	if err1 != nil || err2 != nil {
		b.Fatalf("/proc/%d/stat: %s", pid, raw)
	}
	return time.Duration(utime+stime) * 10 * time.Millisecond
}

// cpuTime is the CPU time the process has used, user and system.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		panic(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func inFlightOf(p *picker.Picker) (tokens, requests int64) {
	for _, h := range p.Hosts() {
		tokens += h.InFlightTokens
		requests += h.InFlightRequests
	}
	return tokens, requests
}

// serveOne plays Envoy's side of one routed request's stream.
func serveOne(client extprocv3.ExternalProcessorClient, n int64) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := client.Process(ctx)
	if err != nil {
		return err
	}
	body := chatBody(n)
	err = stream.Send(&extprocv3.ProcessingRequest{
		Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{
			Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
				{Key: ":method", RawValue: []byte("POST")},
				{Key: ":path", RawValue: []byte("/v1/chat/completions")},
				{Key: ":authority", RawValue: []byte("llm.example")},
				{Key: "content-type", RawValue: []byte("application/json")},
				{Key: "content-length", RawValue: []byte(fmt.Sprint(len(body)))},
				{Key: "x-request-id", RawValue: []byte(fmt.Sprintf("req-%d", n))},
			}}}},
		ProtocolConfig: &extprocv3.ProtocolConfiguration{RequestBodyMode: buffered},
	})
	if err != nil {
		return err
	}
	if resp, err := stream.Recv(); err != nil {
		return err
	} else if resp.GetRequestHeaders() == nil {
		return fmt.Errorf("headers reply %T", resp.Response)
	}
	err = stream.Send(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{
		RequestBody: &extprocv3.HttpBody{Body: body, EndOfStream: true}}})
	if err != nil {
		return err
	}
	if resp, err := stream.Recv(); err != nil {
		return err
	} else if resp.GetRequestBody() == nil {
		return fmt.Errorf("body reply %T", resp.Response)
	}
	err = stream.Send(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{
		ResponseHeaders: &extprocv3.HttpHeaders{Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
			{Key: ":status", RawValue: []byte("200")}}}, EndOfStream: true}}})
	if err != nil {
		return err
	}
	if resp, err := stream.Recv(); err != nil {
		return err
	} else if resp.GetResponseHeaders() == nil {
		return fmt.Errorf("response headers reply %T", resp.Response)
	}
	// END_STREAM; the server returns, which ends the flight.
	if err := stream.CloseSend(); err != nil {
		return err
	}
	if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
		return fmt.Errorf("after end of stream: %v", err)
	}
	return nil
}

// chatBody is a chat completion request of about 1,000 tokens whose text
// differs from every other n's, so that its count is never cached.
func chatBody(n int64) []byte {
	return fmt.Appendf(nil, `{"model":"m","max_tokens":200,"messages":[{"role":"user","content":"request %d: %s"}]}`,
		n, benchText)
}
