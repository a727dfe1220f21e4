package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/tokenlb/tokenlb/internal/envoycfg"
)

// TestTimeouts: with both deploy configs, a client that stalls in its
// headers or its body and a backend that goes silent are cut by Envoy's
// timeouts (shortened here to 1 s), the client of the silent backend gets
// an OpenAI-shaped 504, and tokenlb holds no stream or load for any of them.
func TestTimeouts(t *testing.T) {
	for _, config := range []string{"envoy.yaml", "envoy-override-host.yaml"} {
		t.Run(config, func(t *testing.T) {
			s := startStack(t, envoyOpts{config: config, Options: envoycfg.Options{Timeout: time.Second}})
			addr := fmt.Sprintf("127.0.0.1:%d", s.envoy.port)
			slowHeaders := stall(t, addr, "POST /v1/chat/completions HTTP/1.1\r\nHost: llm\r\n")
			body := chatBody(10, false)
			slowBody := stall(t, addr, fmt.Sprintf("POST /v1/chat/completions HTTP/1.1\r\nHost: llm\r\n"+
				"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body[:len(body)/2]))

			resp, err := s.send(context.Background(), chatBody(10, false), "hung", nil)
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != http.StatusGatewayTimeout {
				t.Fatalf("a silent backend: status %d, want 504", resp.StatusCode)
			}
			openAIError(t, resp)
			resp.Body.Close()
			select {
			case id := <-s.backends[0].cancelled:
				t.Logf("backend saw %s cancelled", id)
			case id := <-s.backends[1].cancelled:
				t.Logf("backend saw %s cancelled", id)
			case id := <-s.backends[2].cancelled:
				t.Logf("backend saw %s cancelled", id)
			case <-time.After(10 * time.Second):
				t.Fatal("the silent backend's request was never cancelled")
			}

			for what, c := range map[string]<-chan *http.Response{"slow headers": slowHeaders, "slow body": slowBody} {
				select {
				case resp := <-c:
					if resp == nil || resp.StatusCode != http.StatusRequestTimeout {
						t.Fatalf("%s: %v, want a 408", what, resp)
					}
					if code, _ := openAIError(t, resp); code != "request_timeout" {
						t.Fatalf("%s: error code %q", what, code)
					}
				case <-time.After(10 * time.Second):
					t.Fatalf("%s: connection still open after 10 s", what)
				}
			}
			s.tokenlb.waitIdle()
			waitFor(t, 10*time.Second, "no tokenlb stream open", func() bool { return s.tokenlb.metric("tokenlb_streams_active") == 0 })
		})
	}
}

// stall opens a connection to addr, writes partial, and sends Envoy's
// answer (its body read; nil if it just closes) once Envoy ends the
// connection.
func stall(t *testing.T, addr, partial string) <-chan *http.Response {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if _, err := conn.Write([]byte(partial)); err != nil {
		t.Fatal(err)
	}
	ended := make(chan *http.Response, 1)
	go func() {
		r := bufio.NewReader(conn)
		resp, err := http.ReadResponse(r, nil)
		if err != nil {
			ended <- nil
			return
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body = io.NopCloser(bytes.NewReader(b))
		io.Copy(io.Discard, r) // until Envoy closes
		ended <- resp
	}()
	return ended
}
