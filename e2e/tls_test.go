package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/tokenlb/tokenlb/internal/envoycfg"
	"github.com/tokenlb/tokenlb/internal/testcert"
)

// TestMutualTLS: with the deploy configs' commented transport_socket block
// turned on and tokenlb's tls settings, Envoy routes through tokenlb over
// mutual TLS; a plaintext client and a TLS client without a certificate
// from the CA cannot use tokenlb's port.
func TestMutualTLS(t *testing.T) {
	dir := t.TempDir()
	certs, err := testcert.New(dir, "")
	if err != nil {
		t.Fatal(err)
	}
	for _, config := range []string{"envoy.yaml", "envoy-override-host.yaml"} {
		t.Run(config, func(t *testing.T) {
			s := startStack(t, envoyOpts{config: config,
				tokenlb: []string{"--tls-cert-file", certs.ServerCert, "--tls-key-file", certs.ServerKey, "--tls-client-ca-file", certs.CA},
				Options: envoycfg.Options{TLS: &envoycfg.TLS{ClientCert: certs.ClientCert, ClientKey: certs.ClientKey,
					CA: certs.CA, ServerName: "localhost"}}})
			// Routed by tokenlb: the destination header reached the backend.
			waitFor(t, 20*time.Second, "a request routed through tokenlb over mutual TLS", func() bool {
				rec := s.complete(t, chatBody(10, false), nil)
				return rec.Header != ""
			})
			if n := s.envoy.stat(t, "cluster.tokenlb.ssl.handshake"); n == 0 {
				t.Fatal("Envoy made no TLS handshake with tokenlb")
			}

			addr := fmt.Sprintf("127.0.0.1:%d", s.tokenlb.grpcPort)
			pem, err := os.ReadFile(certs.CA)
			if err != nil {
				t.Fatal(err)
			}
			roots := x509.NewCertPool()
			roots.AppendCertsFromPEM(pem)
			for name, creds := range map[string]credentials.TransportCredentials{
				"plaintext":               insecure.NewCredentials(),
				"TLS without certificate": credentials.NewTLS(&tls.Config{RootCAs: roots, ServerName: "localhost"}),
			} {
				conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
				if err != nil {
					t.Fatal(err)
				}
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				_, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
				cancel()
				conn.Close()
				if err == nil {
					t.Errorf("%s client: tokenlb answered", name)
				}
			}
		})
	}
}
