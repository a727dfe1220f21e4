package prefix

import "time"

// Options configure a Table.
type Options struct {
	// TTL is how long a host counts as having served a prefix; a backend's
	// cache evicts what it has not used for a while. 0 means 5 minutes.
	TTL time.Duration
	// Entries bounds the table (each entry about 100 bytes); 0 means
	// 1<<16.
	Entries int
}

// Table remembers which hosts recently served each prompt prefix, by the
// hashes of some of the prefix's leading blocks (see kept): an entry is a
// block, not a prompt. Hosts are numbered 0 to 63. It is bounded by two
// generations: when the current one is half of Entries, it becomes the old
// one and the one before is dropped, so what was used least recently goes
// first. It is not safe for concurrent use: the caller locks (the picker
// holds its own lock while it looks up and records).
type Table struct {
	ttl      time.Duration
	half     int
	cur, old map[uint64]*entry
}

// MaxHosts is how many hosts a Table tells apart: one bit each.
const MaxHosts = 64

// entryHosts is how many hosts an entry remembers: the most recent.
const entryHosts = 4

type entry struct {
	host [entryHosts]int8  // host index + 1; 0 is empty
	at   [entryHosts]int64 // when it last served the prefix, Unix ns
}

// NewTable returns an empty Table.
func NewTable(opts Options) *Table {
	if opts.TTL <= 0 {
		opts.TTL = 5 * time.Minute
	}
	if opts.Entries <= 0 {
		opts.Entries = 1 << 16
	}
	return &Table{ttl: opts.TTL, half: max(1, opts.Entries/2), cur: map[uint64]*entry{}, old: map[uint64]*entry{}}
}

func (t *Table) get(k uint64) *entry {
	if e, ok := t.cur[k]; ok {
		return e
	}
	return t.old[k]
}

// kept reports whether the table keeps block i of a prompt of n blocks:
// blocks 1, 2, 4, 8, ... and the last, so that one prompt takes about
// log2(n)+2 entries of the table (7 for 64 blocks), and prompts that share
// a prefix meet at every power of two within it.
func kept(i, n int) bool { return i == n-1 || (i+1)&i == 0 }

// Lookup returns the hosts among eligible (a bit each, by index) that
// served the longest of the prefixes within the TTL, trying shorter ones
// while none of the hosts that served a longer one is eligible, down to
// half the longest served (a host that shares only a prompt's first block,
// a common system prompt, saves it little); matched is how many blocks
// those hosts share with the prompt, and served reports whether any host
// served any of them.
func (t *Table) Lookup(prefix []uint64, eligible uint64, now time.Time) (hosts uint64, matched int, served bool) {
	since := now.Add(-t.ttl).UnixNano()
	floor := 0
	for i := len(prefix) - 1; i >= floor; i-- {
		if !kept(i, len(prefix)) {
			continue
		}
		e := t.get(prefix[i])
		if e == nil {
			continue
		}
		for j, h := range e.host {
			if h != 0 && e.at[j] >= since {
				if !served {
					served, floor = true, i/2
				}
				hosts |= 1 << (h - 1)
			}
		}
		if hosts&eligible != 0 {
			return hosts & eligible, i + 1, true
		}
		hosts = 0
	}
	return 0, 0, served
}

// Served returns how many leading blocks of prefix host served within the
// TTL: the longest of the prefixes the table keeps that it served.
func (t *Table) Served(prefix []uint64, host int, now time.Time) (blocks int) {
	since := now.Add(-t.ttl).UnixNano()
	for i := len(prefix) - 1; i >= 0; i-- {
		if !kept(i, len(prefix)) {
			continue
		}
		e := t.get(prefix[i])
		if e == nil {
			continue
		}
		for j, h := range e.host {
			if int(h) == host+1 && e.at[j] >= since {
				return i + 1
			}
		}
	}
	return 0
}

// Record notes that host served every prefix (the blocks the table keeps).
func (t *Table) Record(prefix []uint64, host int, now time.Time) {
	at := now.UnixNano()
	for i, k := range prefix {
		if !kept(i, len(prefix)) {
			continue
		}
		e, ok := t.cur[k]
		if !ok {
			e = t.old[k] // carried over, before a rotation drops the old generation
			if len(t.cur) >= t.half {
				t.old, t.cur = t.cur, make(map[uint64]*entry, t.half)
			}
			if e == nil {
				e = &entry{}
			}
			t.cur[k] = e
		}
		// Replace this host's slot, else an empty one, else the oldest.
		slot := -1
		for j := range e.host {
			if int(e.host[j]) == host+1 {
				slot = j
				break
			}
		}
		if slot < 0 {
			slot = 0
			for j := range e.host {
				if e.host[j] == 0 {
					slot = j
					break
				}
				if e.at[j] < e.at[slot] {
					slot = j
				}
			}
		}
		e.host[slot], e.at[slot] = int8(host+1), at
	}
}

// Forget drops host from every entry, so that the index can be given to
// another host: it no longer counts as having served anything.
func (t *Table) Forget(host int) {
	for _, gen := range []map[uint64]*entry{t.cur, t.old} {
		for _, e := range gen {
			for j := range entryHosts {
				if int(e.host[j]) == host+1 {
					e.host[j], e.at[j] = 0, 0
				}
			}
		}
	}
}

// Len returns how many entries the table holds.
func (t *Table) Len() int { return len(t.cur) + len(t.old) }
