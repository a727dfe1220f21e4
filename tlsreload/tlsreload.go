// Package tlsreload serves TLS from certificate, key and CA files that are
// read again whenever they change, so that rotated certificates (a
// Kubernetes Secret update, cert-manager) take effect without a restart.
//
// Each handshake looks at the files' size and modification time; when any
// changed, they are loaded again. A change that does not load (a key that no
// longer matches its certificate, a file half written) keeps the previous
// files in service and is logged once.
package tlsreload

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"log/slog"
	"math/big"
	"os"
	"sync"
	"time"
)

// Files names a server's PEM files.
type Files struct {
	// Cert and Key are the server's certificate chain and private key.
	Cert, Key string
	// ClientCA, when set, is the CA bundle that clients' certificates must
	// chain to: mutual TLS, and a client without such a certificate is
	// refused during the handshake.
	ClientCA string
}

// ServerConfig returns a TLS server configuration for f (TLS 1.2 or later,
// ALPN h2 as gRPC requires), or the error that loading f gave.
func ServerConfig(f Files, log *slog.Logger) (*tls.Config, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &reloader{files: f, log: log}
	if err := r.reload(); err != nil {
		return nil, err
	}
	return &tls.Config{MinVersion: tls.VersionTLS12, NextProtos: []string{"h2"}, GetConfigForClient: r.config}, nil
}

type reloader struct {
	files Files
	log   *slog.Logger

	mu     sync.Mutex
	loaded string // stamp of the files in service
	failed string // stamp of files that did not load, logged once
	cfg    *tls.Config
}

// config is tls.Config.GetConfigForClient: the configuration of the files
// as they are now, or as they last loaded.
func (r *reloader) config(*tls.ClientHelloInfo) (*tls.Config, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.stamp()
	if s == r.loaded || s == r.failed {
		return r.cfg, nil
	}
	if err := r.reloadLocked(s); err != nil {
		r.failed = s
		r.log.Error("TLS files changed but do not load; serving the previous ones", "err", err)
		return r.cfg, nil
	}
	r.log.Info("TLS files reloaded", "cert", r.files.Cert, "client_ca", r.files.ClientCA)
	return r.cfg, nil
}

func (r *reloader) reload() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.reloadLocked(r.stamp())
}

func (r *reloader) reloadLocked(stamp string) error {
	cert, err := tls.LoadX509KeyPair(r.files.Cert, r.files.Key)
	if err != nil {
		return fmt.Errorf("tls: certificate %s and key %s: %w", r.files.Cert, r.files.Key, err)
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, NextProtos: []string{"h2"}, Certificates: []tls.Certificate{cert}}
	if r.files.ClientCA != "" {
		pem, err := os.ReadFile(r.files.ClientCA)
		if err != nil {
			return fmt.Errorf("tls: client CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("tls: client CA %s holds no PEM certificate", r.files.ClientCA)
		}
		cfg.ClientCAs, cfg.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	r.cfg, r.loaded, r.failed = cfg, stamp, ""
	return nil
}

// stamp sums up the files' sizes and modification times (following
// symbolic links, as a Kubernetes Secret volume swaps them).
func (r *reloader) stamp() string {
	var s string
	for _, name := range []string{r.files.Cert, r.files.Key, r.files.ClientCA} {
		if name == "" {
			continue
		}
		fi, err := os.Stat(name)
		if err != nil {
			s += "missing;"
			continue
		}
		s += fmt.Sprintf("%d/%d;", fi.Size(), fi.ModTime().UnixNano())
	}
	return s
}

// SelfSigned returns a TLS server configuration (TLS 1.2 or later, ALPN
// h2) with a certificate and key generated now, valid for ten years from
// an hour ago: encryption without identity, for clients that skip
// verification, as gateways do with an Endpoint Picker's default
// certificate.
func SelfSigned() (*tls.Config, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("tlsreload: self-signed key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("tlsreload: serial number: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "tokenlb"},
		DNSNames:     []string{"tokenlb"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("tlsreload: self-signed certificate: %w", err)
	}
	cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	return &tls.Config{MinVersion: tls.VersionTLS12, NextProtos: []string{"h2"}, Certificates: []tls.Certificate{cert}}, nil
}
