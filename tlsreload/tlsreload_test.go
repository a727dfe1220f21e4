package tlsreload

import (
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"io"
	"os"
	"testing"
	"time"

	"github.com/tokenlb/tokenlb/internal/testcert"
)

// serve accepts TLS connections with cfg and writes "ok" on each that
// completes its handshake.
func serve(t *testing.T, cfg *tls.Config) string {
	t.Helper()
	l, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if c.(*tls.Conn).Handshake() == nil {
					io.WriteString(c, "ok")
				}
			}()
		}
	}()
	return l.Addr().String()
}

// dial connects trusting ca's certificate, presenting the client
// certificate of client if it is not nil, and reports whether the server
// accepted the connection.
func dial(t *testing.T, addr string, ca string, client *testcert.Set) error {
	t.Helper()
	pem, err := os.ReadFile(ca)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	cfg := &tls.Config{RootCAs: roots, ServerName: "localhost", NextProtos: []string{"h2"}}
	if client != nil {
		cert, err := tls.LoadX509KeyPair(client.ClientCert, client.ClientKey)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	c, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	// With TLS 1.3 the server judges the client's certificate after the
	// client's handshake is done: its verdict shows in the first read.
	b := make([]byte, 2)
	if _, err := io.ReadFull(c, b); err != nil {
		return err
	}
	return nil
}

func TestMutualTLS(t *testing.T) {
	dir := t.TempDir()
	set, err := testcert.New(dir, "a-")
	if err != nil {
		t.Fatal(err)
	}
	other, err := testcert.New(dir, "b-")
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := ServerConfig(Files{Cert: set.ServerCert, Key: set.ServerKey, ClientCA: set.CA}, nil)
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, cfg)
	for _, tc := range []struct {
		name   string
		client *testcert.Set
		ok     bool
	}{
		{"the CA's client", &set, true},
		{"no client certificate", nil, false},
		{"another CA's client", &other, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := dial(t, addr, set.CA, tc.client); (err == nil) != tc.ok {
				t.Fatalf("accepted: %v (%v), want %v", err == nil, err, tc.ok)
			}
		})
	}
	// Server-only TLS: any client that trusts the server connects.
	cfg, err = ServerConfig(Files{Cert: set.ServerCert, Key: set.ServerKey}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := dial(t, serve(t, cfg), set.CA, nil); err != nil {
		t.Fatalf("server-only TLS: %v", err)
	}
}

// TestReload: new files are served from the next handshake; files that do
// not load leave the previous ones in service.
func TestReload(t *testing.T) {
	dir := t.TempDir()
	old, err := testcert.New(dir, "old-")
	if err != nil {
		t.Fatal(err)
	}
	next, err := testcert.New(dir, "next-")
	if err != nil {
		t.Fatal(err)
	}
	files := Files{Cert: dir + "/server.pem", Key: dir + "/server-key.pem", ClientCA: dir + "/ca.pem"}
	install := func(s testcert.Set, when time.Time) {
		t.Helper()
		for from, to := range map[string]string{s.ServerCert: files.Cert, s.ServerKey: files.Key, s.CA: files.ClientCA} {
			b, err := os.ReadFile(from)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(to, b, 0o600); err != nil {
				t.Fatal(err)
			}
			// A distinct time, whatever the file system's resolution.
			if err := os.Chtimes(to, when, when); err != nil {
				t.Fatal(err)
			}
		}
	}
	start := time.Now()
	install(old, start)
	cfg, err := ServerConfig(files, nil)
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, cfg)
	if err := dial(t, addr, old.CA, &old); err != nil {
		t.Fatalf("before the rotation: %v", err)
	}
	install(next, start.Add(time.Minute))
	if err := dial(t, addr, next.CA, &next); err != nil {
		t.Fatalf("after the rotation: %v", err)
	}
	if err := dial(t, addr, old.CA, &old); err == nil {
		t.Fatal("the old certificates still accepted after the rotation")
	}
	// A broken key: the rotated files stay in service.
	if err := os.WriteFile(files.Key, []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(files.Key, start.Add(2*time.Minute), start.Add(2*time.Minute)); err != nil {
		t.Fatal(err)
	}
	if _, err := tls.LoadX509KeyPair(files.Cert, files.Key); err == nil {
		t.Fatal("the broken key loads")
	}
	if err := dial(t, addr, next.CA, &next); err != nil {
		t.Fatalf("after a broken key was written: %v", err)
	}
	// Fixed again, with the old set: served from the next handshake.
	install(old, start.Add(3*time.Minute))
	if err := dial(t, addr, old.CA, &old); err != nil {
		t.Fatalf("after the files were fixed: %v", err)
	}
}

func TestServerConfigErrors(t *testing.T) {
	dir := t.TempDir()
	set, err := testcert.New(dir, "")
	if err != nil {
		t.Fatal(err)
	}
	for name, f := range map[string]Files{
		"missing certificate": {Cert: dir + "/nope.pem", Key: set.ServerKey},
		"key of another pair": {Cert: set.ServerCert, Key: set.ClientKey},
		"CA without PEM":      {Cert: set.ServerCert, Key: set.ServerKey, ClientCA: set.ServerKey},
		"missing CA":          {Cert: set.ServerCert, Key: set.ServerKey, ClientCA: dir + "/nope.pem"},
	} {
		if _, err := ServerConfig(f, nil); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

// TestSelfSigned: a client that skips verification gets an encrypted
// connection with h2; one that verifies does not (the certificate proves
// nothing); each start has its own key.
func TestSelfSigned(t *testing.T) {
	cfg, err := SelfSigned()
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, cfg)
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatalf("a client that skips verification: %v", err)
	}
	defer c.Close()
	if p := c.ConnectionState().NegotiatedProtocol; p != "h2" {
		t.Fatalf("ALPN %q, want h2 (gRPC)", p)
	}
	if _, err := tls.Dial("tcp", addr, &tls.Config{ServerName: "tokenlb"}); err == nil {
		t.Fatal("a verifying client accepted a self-signed certificate")
	}
	again, err := SelfSigned()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Certificates[0].PrivateKey.(*ecdsa.PrivateKey).Equal(again.Certificates[0].PrivateKey) {
		t.Fatal("two starts share a key")
	}
}
