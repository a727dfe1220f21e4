package tokenizer

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// BenchmarkCount counts each text of the corpus (testdata/corpus) with both
// engines and both encodings, without the cache. The two engines run one
// after the other on each text, so that a machine whose speed drifts
// slows both alike. Compare them with
//
//	go test -c -o tokenizer.test ./tokenizer
//	for i in $(seq 10); do (cd tokenizer && ../tokenizer.test -test.run '^$' -test.bench 'Count$'); done > bench.txt
//	benchstat -col /engine bench.txt
//
// (make bench-tokenizer does that): ten rounds of one run each, rather than
// -count 10, which runs each benchmark ten times in a row.
func BenchmarkCount(b *testing.B) {
	texts := corpus(b)
	for _, enc := range Encodings {
		tks := map[string]*Tokenizer{}
		for _, eng := range Engines {
			tk, err := New(Options{Encoding: enc, Engine: eng, CacheEntries: -1})
			if err != nil {
				b.Fatal(err)
			}
			tks[eng] = tk
		}
		for _, name := range []string{"prose", "code", "chat", "cjk", "mixed"} {
			text := texts[name]
			for _, eng := range Engines {
				tk := tks[eng]
				b.Run("enc="+enc+"/text="+name+"/engine="+eng, func(b *testing.B) {
					b.SetBytes(int64(len(text)))
					b.ReportAllocs()
					for b.Loop() {
						tk.engine.count(text, time.Time{})
					}
				})
			}
		}
	}
}

// corpus returns the benchmark corpus: testdata/corpus, one text a file.
func corpus(t testing.TB) map[string]string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join("testdata", "corpus", "*"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no corpus in testdata/corpus: %v", err)
	}
	texts := map[string]string{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		texts[strings.SplitN(filepath.Base(f), ".", 2)[0]] = string(b)
	}
	return texts
}
