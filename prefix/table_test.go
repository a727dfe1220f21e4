package prefix

import (
	"testing"
	"time"
)

func TestPrefixTableBounded(t *testing.T) {
	tab := NewTable(Options{Entries: 100, TTL: time.Hour})
	now := time.Unix(0, 0)
	for i := range uint64(10000) {
		tab.Record([]uint64{i}, int(i%3), now)
		if tab.Len() > 100 {
			t.Fatalf("%d entries after %d records, bound 100", tab.Len(), i+1)
		}
	}
	all := ^uint64(0)
	// The most recent are still there, the oldest gone.
	if h, _, _ := tab.Lookup([]uint64{9999}, all, now); h != 1<<(9999%3) {
		t.Fatal("the table lost the most recent prefix")
	}
	if _, _, served := tab.Lookup([]uint64{0}, all, now); served {
		t.Fatal("the table kept the oldest prefix")
	}
	// An entry remembers the last entryHosts hosts.
	for h := range 6 {
		tab.Record([]uint64{42}, h, now.Add(time.Duration(h)))
	}
	if got, _, _ := tab.Lookup([]uint64{42}, all, now); got != 0b111100 {
		t.Fatalf("hosts of a prefix served by 6: %b, want the last 4", got)
	}
	// A prefix used again while in the old generation is carried over, and
	// survives the next rotation with what it knew.
	tab = NewTable(Options{Entries: 4, TTL: time.Hour})
	tab.Record([]uint64{1}, 0, now)
	tab.Record([]uint64{2}, 0, now) // cur full: {1, 2}
	tab.Record([]uint64{3}, 0, now) // rotation: old {1, 2}, cur {3}
	tab.Record([]uint64{1}, 1, now) // carried over: cur {3, 1}
	tab.Record([]uint64{4}, 0, now) // rotation: old {3, 1}, cur {4}
	if got, _, _ := tab.Lookup([]uint64{1}, all, now); got != 0b11 {
		t.Fatalf("a carried-over prefix knows hosts %b, want both that served it", got)
	}
}

// TestPrefixTableKeeps: a prompt takes at most 8 entries (blocks 1, 2, 4,
// ... and its last), and prompts sharing a prefix meet at those blocks.
func TestPrefixTableKeeps(t *testing.T) {
	tab := NewTable(Options{TTL: time.Hour})
	now := time.Unix(0, 0)
	long := make([]uint64, 64)
	for i := range long {
		long[i] = uint64(1000 + i)
	}
	tab.Record(long, 2, now)
	if n := tab.Len(); n != 7 {
		t.Fatalf("a 64-block prompt took %d entries, want 7 (blocks 1, 2, 4, ..., 64)", n)
	}
	// A prompt sharing the first 40 blocks meets it at block 32.
	other := append(append([]uint64{}, long[:40]...), 7, 8, 9)
	if got, matched, _ := tab.Lookup(other, ^uint64(0), now); got != 1<<2 || matched != 32 {
		t.Fatalf("a prompt sharing 40 blocks found hosts %b", got)
	}
	// When the host that served the longer prefix is not eligible, a
	// shorter prefix another host served counts, down to half the longest.
	tab.Record(long[:40], 1, now)
	tab.Record(long[:4], 0, now)
	if got, _, _ := tab.Lookup(long, 1<<1, now); got != 1<<1 {
		t.Fatalf("with only host 1 (32 blocks in common) eligible, found %b", got)
	}
	if got, _, served := tab.Lookup(long, 1<<0, now); got != 0 || !served {
		t.Fatalf("with only host 0 (4 blocks in common of 64) eligible: %b, served %v; want none, served", got, served)
	}
}

// TestServed: how many leading blocks a host served is the longest kept
// prefix it served, within the TTL.
func TestServed(t *testing.T) {
	tab := NewTable(Options{TTL: time.Minute})
	now := time.Unix(0, 0)
	long := make([]uint64, 64)
	for i := range long {
		long[i] = uint64(1000 + i)
	}
	tab.Record(long[:40], 1, now)
	tab.Record(long[:4], 0, now)
	for _, tc := range []struct{ host, want int }{{1, 32}, {0, 4}, {2, 0}} {
		if got := tab.Served(long, tc.host, now); got != tc.want {
			t.Errorf("host %d served %d blocks, want %d", tc.host, got, tc.want)
		}
	}
	if got := tab.Served(long, 1, now.Add(2*time.Minute)); got != 0 {
		t.Errorf("after the TTL, host 1 served %d blocks", got)
	}
}

// TestForget: a forgotten host no longer counts as having served a prefix;
// the others still do.
func TestForget(t *testing.T) {
	now := time.Unix(100, 0)
	tb := NewTable(Options{TTL: time.Minute})
	doc := []uint64{1, 2, 3}
	tb.Record(doc, 0, now)
	tb.Record(doc, 5, now)
	tb.Forget(0)
	if blocks := tb.Served(doc, 0, now); blocks != 0 {
		t.Fatalf("forgotten host served %d blocks", blocks)
	}
	if blocks := tb.Served(doc, 5, now); blocks != 3 {
		t.Fatalf("other host served %d blocks, want 3", blocks)
	}
}
