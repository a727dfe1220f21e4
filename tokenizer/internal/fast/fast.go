// Package fast counts the tokens of a text in cl100k_base or o200k_base,
// exactly as many as github.com/pkoukk/tiktoken-go's EncodeOrdinary
// returns, without building them.
//
// A hand-written pre-tokenizer for each encoding (split.go) cuts the text
// into pieces, and byte-pair merging by rank counts the parts each piece
// leaves (bpe.go), helped by a rank table (ranks.go), a backtracker for long
// pieces (backtrack.go) and cuts between characters of Chinese, Japanese or
// Korean that no token crosses (cuts.go). The BPE ranks come from the files
// embedded by tiktoken-go-loader: nothing is downloaded.
package fast

import (
	"fmt"
	"sync"
)

// loaders build each encoding once per process, on first use: its
// indexes of the vocabulary are read-only, shared by every caller, and take
// a few hundred milliseconds to build.
var loaders = map[string]func() (*Encoding, error){
	"cl100k_base": sync.OnceValues(func() (*Encoding, error) { return newEncoding("cl100k_base") }),
	"o200k_base":  sync.OnceValues(func() (*Encoding, error) { return newEncoding("o200k_base") }),
}

// Load returns the encoding of that name (cl100k_base or o200k_base),
// built on the first call for it and shared by every later one.
func Load(encoding string) (*Encoding, error) {
	load, ok := loaders[encoding]
	if !ok {
		return nil, fmt.Errorf("no fast path for %s", encoding)
	}
	return load()
}
