package picker

import "time"

// prefixTable remembers which hosts recently served each prompt prefix, by
// the hashes of some of the prefix's leading blocks (see kept): an entry is
// a block, not a prompt. It is bounded by two generations: when the current one is half of Entries, it becomes the old
// one and the one before is dropped, so what was used least recently goes
// first. The picker's lock guards it.
type prefixTable struct {
	ttl      time.Duration
	half     int
	cur, old map[uint64]*prefixEntry
}

// prefixHosts is how many hosts an entry remembers: the most recent.
const prefixHosts = 4

type prefixEntry struct {
	host [prefixHosts]int8  // host index + 1; 0 is empty
	at   [prefixHosts]int64 // when it last served the prefix, Unix ns
}

func newPrefixTable(a Affinity) *prefixTable {
	if a.TTL <= 0 {
		a.TTL = 5 * time.Minute
	}
	if a.Entries <= 0 {
		a.Entries = 1 << 16
	}
	return &prefixTable{ttl: a.TTL, half: max(1, a.Entries/2), cur: map[uint64]*prefixEntry{}, old: map[uint64]*prefixEntry{}}
}

func (t *prefixTable) get(k uint64) *prefixEntry {
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

// lookup returns the hosts among eligible (a bit each, by index) that
// served the longest of the prefixes within the TTL, trying shorter ones
// while none of the hosts that served a longer one is eligible, down to
// half the longest served (a host that shares only a prompt's first block,
// a common system prompt, saves it little); matched is how many blocks
// those hosts share with the prompt, and served reports whether any host
// served any of them.
func (t *prefixTable) lookup(prefix []uint64, eligible uint64, now time.Time) (hosts uint64, matched int, served bool) {
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

// record notes that host served every prefix (the blocks the table keeps).
func (t *prefixTable) record(prefix []uint64, host int, now time.Time) {
	at := now.UnixNano()
	for i, k := range prefix {
		if !kept(i, len(prefix)) {
			continue
		}
		e, ok := t.cur[k]
		if !ok {
			e = t.old[k] // carried over, before a rotation drops the old generation
			if len(t.cur) >= t.half {
				t.old, t.cur = t.cur, make(map[uint64]*prefixEntry, t.half)
			}
			if e == nil {
				e = &prefixEntry{}
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

// len returns how many prefixes the table holds.
func (t *prefixTable) len() int { return len(t.cur) + len(t.old) }
