package tokenizer

import (
	"strings"
	"testing"
)

// Texts of about 20 KB: English prose, source code, and CJK.
var benchTexts = map[string]string{
	"prose": strings.Repeat("The committee reviewed the quarterly report, noting that revenue grew 12% while costs fell. ", 220),
	"code":  strings.Repeat("func (s *Server) Handle(w http.ResponseWriter, r *http.Request) {\n\tif err := s.check(r); err != nil {\n\t\treturn\n\t}\n}\n", 180),
	"cjk":   strings.Repeat("東京の天気は晴れで、気温は二十度です。明日は雨が降るでしょう。", 220),
}

func BenchmarkCount(b *testing.B) {
	tk := newTokenizer(b, "cl100k_base")
	for name, text := range benchTexts {
		b.Run(name, func(b *testing.B) {
			b.SetBytes(int64(len(text)))
			for b.Loop() {
				tk.Count(text)
			}
		})
	}
}
