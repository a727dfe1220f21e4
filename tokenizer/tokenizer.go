// Package tokenizer turns an LLM API request body into a prompt token count.
//
// It knows the request shapes of the OpenAI chat completions, completions,
// embeddings and responses APIs and of the Anthropic messages API, and counts
// everything else by its string values. Counting uses a tiktoken encoding
// (cl100k_base or o200k_base) whose BPE ranks are compiled into the binary:
// nothing is downloaded at run time.
package tokenizer

import (
	"fmt"
	"unicode"
	"unicode/utf8"

	tiktoken "github.com/pkoukk/tiktoken-go"
	tiktokenloader "github.com/pkoukk/tiktoken-go-loader"
)

// Encodings lists the encoding names New accepts.
var Encodings = []string{"cl100k_base", "o200k_base"}

// Tokenizer counts tokens with one tiktoken encoding. It is safe for
// concurrent use.
type Tokenizer struct {
	name string
	enc  *tiktoken.Tiktoken
}

// New returns a Tokenizer for the named encoding. The BPE ranks come from the
// files embedded by tiktoken-go-loader, so New never touches the network.
func New(encoding string) (*Tokenizer, error) {
	known := false
	for _, e := range Encodings {
		known = known || e == encoding
	}
	if !known {
		return nil, fmt.Errorf("tokenizer: unknown encoding %q (want one of %v)", encoding, Encodings)
	}
	// tiktoken-go keeps its loader in a package variable; the offline loader is
	// the only one tokenlb ever installs, so setting it on every call is
	// idempotent and safe.
	tiktoken.SetBpeLoader(tiktokenloader.NewOfflineLoader())
	enc, err := tiktoken.GetEncoding(encoding)
	if err != nil {
		return nil, fmt.Errorf("tokenizer: load %s: %w", encoding, err)
	}
	return &Tokenizer{name: encoding, enc: enc}, nil
}

// Encoding returns the encoding's name.
func (t *Tokenizer) Encoding() string { return t.name }

// Count returns the number of tokens in s. Special-token text such as
// "<|endoftext|>" is counted as ordinary text, as a model's chat template
// treats user content.
//
// Byte-pair merging in tiktoken-go is quadratic in the length of one
// pre-tokenizer piece, so a long run without word breaks (a wall of
// punctuation, a paragraph of CJK) could stall a core for minutes. Count
// therefore encodes long texts in chunks of at most chunkBytes. It cuts where
// a letter, a space and a letter meet: both encodings always start a new piece
// at that space, so the count stays exact. Only a stretch of maxChunk bytes
// with no such place is cut elsewhere (on a rune boundary), which can change
// the count by a token or so at each such cut.
func (t *Tokenizer) Count(s string) int {
	n := 0
	for s != "" {
		chunk := s[:cut(s)]
		n += len(t.enc.EncodeOrdinary(chunk))
		s = s[len(chunk):]
	}
	return n
}

const (
	chunkBytes = 4 << 10  // preferred chunk size
	maxChunk   = 16 << 10 // largest chunk searched for an exact cut
	roughChunk = 512      // size of a chunk cut where no exact cut exists
)

// cut returns the length of the next chunk of s to encode.
func cut(s string) int {
	if len(s) <= chunkBytes {
		return len(s)
	}
	end := min(len(s), maxChunk)
	// The last exact cut below chunkBytes, else the first one above it.
	best := -1
	for i := 1; i+1 < end; i++ {
		if s[i] != ' ' || !isLetterAt(s, i+1) || !isLetterBefore(s, i) {
			continue
		}
		if i >= chunkBytes {
			if best < 0 {
				best = i
			}
			break
		}
		best = i
	}
	if best > 0 {
		return best
	}
	// No exact cut: take roughChunk bytes, backed up to a rune start.
	i := roughChunk
	for i > 0 && !utf8.RuneStart(s[i]) {
		i--
	}
	return i
}

func isLetterAt(s string, i int) bool {
	r, _ := utf8.DecodeRuneInString(s[i:])
	return unicode.IsLetter(r)
}

func isLetterBefore(s string, i int) bool {
	r, _ := utf8.DecodeLastRuneInString(s[:i])
	return unicode.IsLetter(r)
}
