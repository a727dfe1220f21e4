package discovery

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Source reports the fleet as it changes: Run calls update with the whole
// set each time it differs from the last (initial is the set running
// now), until ctx is done.
type Source interface {
	Run(ctx context.Context, initial []Endpoint, update func([]Endpoint))
}

// DNS is the dns source: the A and AAAA records of a name (a Kubernetes
// headless Service, say), each with the same port, resolved again every
// Interval. It needs no Kubernetes API access.
type DNS struct {
	// Name is "name:port".
	Name string
	// Interval is how often the name is resolved; 0 means 5 seconds.
	Interval time.Duration
	// Server is the DNS server (ip:port) asked; "" asks the system's.
	Server string
	// Timeout bounds one resolution; 0 means 2 seconds.
	Timeout time.Duration
	Logger  *slog.Logger
	// Errors counts resolutions that failed or found no address; nil
	// counts nothing.
	Errors prometheus.Counter
}

// Resolve returns the name's addresses now, in order, each with the port.
// An answer without any address is an error: the running set is kept
// rather than emptied by one bad answer.
func (d *DNS) Resolve(ctx context.Context) ([]Endpoint, error) {
	host, port, err := net.SplitHostPort(d.Name)
	if err != nil {
		return nil, fmt.Errorf("discovery: dns name %q: %w", d.Name, err)
	}
	timeout := d.Timeout
	if timeout <= 0 {
		timeout = 2 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	r := net.DefaultResolver
	if d.Server != "" {
		var dialer net.Dialer
		r = &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return dialer.DialContext(ctx, network, d.Server)
		}}
	}
	ips, err := r.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return nil, fmt.Errorf("discovery: resolving %s: %w", host, err)
	}
	var out []Endpoint
	for _, ip := range ips {
		out = append(out, Endpoint{Address: net.JoinHostPort(ip.Unmap().String(), port), Source: "dns " + d.Name})
	}
	if len(out) == 0 {
		return nil, errors.New("discovery: " + host + " has no address")
	}
	slices.SortFunc(out, func(a, b Endpoint) int {
		return netip.MustParseAddrPort(a.Address).Compare(netip.MustParseAddrPort(b.Address))
	})
	return slices.CompactFunc(out, func(a, b Endpoint) bool { return a.Address == b.Address }), nil
}

// Run resolves the name every Interval and reports each new set.
func (d *DNS) Run(ctx context.Context, initial []Endpoint, update func([]Endpoint)) {
	log := d.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	interval := d.Interval
	if interval <= 0 {
		interval = 5 * time.Second
	}
	last := slices.Clone(initial)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		next, err := d.Resolve(ctx)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			if d.Errors != nil {
				d.Errors.Inc()
			}
			log.Warn("hosts not resolved: keeping the running ones", "name", d.Name, "err", err)
			continue
		}
		if slices.EqualFunc(next, last, func(a, b Endpoint) bool { return a.Address == b.Address }) {
			continue
		}
		last = next
		update(next)
	}
}
