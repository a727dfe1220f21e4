// Package testdns is a DNS server on loopback for tests: every name it is
// asked about has the addresses the test last set (A and AAAA records), or
// none (NXDOMAIN).
package testdns

import (
	"net"
	"net/netip"
	"sync"

	"github.com/miekg/dns"
)

// Zone answers every question with its addresses.
type Zone struct {
	mu    sync.Mutex
	addrs []string // nil answers NXDOMAIN
}

// Set makes addrs the answer from now on: nil (no argument) answers
// NXDOMAIN, an empty list an answer with no record.
func (z *Zone) Set(addrs ...string) {
	z.mu.Lock()
	defer z.mu.Unlock()
	z.addrs = addrs
}

// ServeDNS implements dns.Handler.
func (z *Zone) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(req)
	z.mu.Lock()
	defer z.mu.Unlock()
	if z.addrs == nil {
		m.Rcode = dns.RcodeNameError
	}
	for _, q := range req.Question {
		for _, a := range z.addrs {
			ip := netip.MustParseAddr(a)
			hdr := dns.RR_Header{Name: q.Name, Class: dns.ClassINET}
			switch {
			case q.Qtype == dns.TypeA && ip.Is4():
				hdr.Rrtype = dns.TypeA
				m.Answer = append(m.Answer, &dns.A{Hdr: hdr, A: net.IP(ip.AsSlice())})
			case q.Qtype == dns.TypeAAAA && ip.Is6():
				hdr.Rrtype = dns.TypeAAAA
				m.Answer = append(m.Answer, &dns.AAAA{Hdr: hdr, AAAA: net.IP(ip.AsSlice())})
			}
		}
	}
	w.WriteMsg(m)
}

// Start serves z over UDP and TCP on one free loopback port and returns
// its address and a function that stops it.
func (z *Zone) Start() (addr string, stop func(), err error) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	l, err := net.Listen("tcp", pc.LocalAddr().String())
	if err != nil {
		pc.Close()
		return "", nil, err
	}
	udp, tcp := &dns.Server{PacketConn: pc, Handler: z}, &dns.Server{Listener: l, Handler: z}
	go udp.ActivateAndServe()
	go tcp.ActivateAndServe()
	return pc.LocalAddr().String(), func() { udp.Shutdown(); tcp.Shutdown() }, nil
}
