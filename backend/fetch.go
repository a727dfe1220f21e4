package backend

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"
)

// maxBodyBytes bounds a model list or a metrics page read from a host.
const maxBodyBytes = 4 << 20

// newClient returns the client a Watcher uses when Options.Client is nil.
func newClient() *http.Client {
	// Backends are addressed by IP: never through a proxy from the
	// environment.
	return &http.Client{Transport: &http.Transport{Proxy: nil, MaxIdleConnsPerHost: 4,
		IdleConnTimeout: time.Minute, ResponseHeaderTimeout: time.Minute}}
}

// noRedirects is the watcher's redirect policy: a redirect is the answer,
// and not a 2xx.
func noRedirects(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }

// fetch GETs path on addr within timeout. A transport error or a status
// other than 2xx is an error that names the path; read, if not nil, is
// given the body (at most maxBodyBytes of it). What is left of the body is
// drained, up to 64 KiB, so that the connection is reused.
func (w *Watcher) fetch(ctx context.Context, addr, path string, timeout time.Duration, read func(io.Reader) error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", "http://"+addr+path, nil)
	if err != nil {
		return fmt.Errorf("GET %s: %w", path, err)
	}
	resp, err := w.opts.Client.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w", path, stripURLError(err))
	}
	defer resp.Body.Close()
	defer io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("GET %s: status %d", path, resp.StatusCode)
	}
	if read != nil {
		if err := read(io.LimitReader(resp.Body, maxBodyBytes)); err != nil {
			return fmt.Errorf("GET %s: %w", path, err)
		}
	}
	return nil
}

// stripURLError drops the `Get "http://...": ` that net/http puts before a
// transport error: the host and path are said already.
func stripURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}
