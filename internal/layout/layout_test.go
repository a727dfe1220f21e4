// Package layout checks, in tests only, the rules that keep a request's
// life readable: the ext_proc protocol imports no policy, the ledger knows
// no protocol, and no function grows past what a reader takes in at once.
package layout

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

const module = "github.com/tokenlb/tokenlb/"

// root is the repository, two levels up from this package.
var root = filepath.Join("..", "..")

// sources parses the non-test Go files under dir (relative to root).
func sources(t *testing.T, dir string) (*token.FileSet, map[string]*ast.File) {
	t.Helper()
	fset := token.NewFileSet()
	files := map[string]*ast.File{}
	err := filepath.WalkDir(filepath.Join(root, dir), func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "testdata" || strings.HasPrefix(d.Name(), ".")) && path != filepath.Join(root, dir) {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		files[path] = f
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatalf("no Go files under %s", dir)
	}
	return fset, files
}

// TestProcessorImportsNoPolicy: the ext_proc protocol calls a Router and
// knows nothing of what requests cost or where they go.
func TestProcessorImportsNoPolicy(t *testing.T) {
	_, files := sources(t, "processor")
	for path, f := range files {
		for _, imp := range f.Imports {
			p, _ := strconv.Unquote(imp.Path.Value)
			for _, policy := range []string{"picker", "cost", "tokenizer", "route", "prefix", "backend"} {
				if p == module+policy || strings.HasPrefix(p, module+policy+"/") {
					t.Errorf("%s imports %s", path, p)
				}
			}
		}
	}
}

// TestPickerKnowsNoProtocol: the ledger names no ext_proc phase; release
// causes are its caller's.
func TestPickerKnowsNoProtocol(t *testing.T) {
	_, files := sources(t, "picker")
	for path, f := range files {
		for _, imp := range f.Imports {
			if p, _ := strconv.Unquote(imp.Path.Value); strings.Contains(p, "envoyproxy") || p == module+"processor" {
				t.Errorf("%s imports %s", path, p)
			}
		}
		ast.Inspect(f, func(n ast.Node) bool {
			if lit, ok := n.(*ast.BasicLit); ok && lit.Kind == token.STRING {
				s, _ := strconv.Unquote(lit.Value)
				for _, phase := range []string{"response_headers", "response_end", "stream_end", "immediate_response", "request_body"} {
					if strings.Contains(s, phase) {
						t.Errorf("%s names the ext_proc phase %q", path, phase)
					}
				}
			}
			return true
		})
	}
}

// maxLines is the longest function body allowed outside tests.
const maxLines = 80

// TestFunctionsAreShort: no function (or function literal) outside tests
// has a body of more than maxLines lines.
func TestFunctionsAreShort(t *testing.T) {
	fset, files := sources(t, ".")
	var long []string
	for path, f := range files {
		ast.Inspect(f, func(n ast.Node) bool {
			var body *ast.BlockStmt
			name := "a function literal"
			switch x := n.(type) {
			case *ast.FuncDecl:
				body, name = x.Body, x.Name.Name
			case *ast.FuncLit:
				body = x.Body
			}
			if body != nil {
				if lines := fset.Position(body.Rbrace).Line - fset.Position(body.Lbrace).Line - 1; lines > maxLines {
					long = append(long, path+": "+name+" has "+strconv.Itoa(lines)+" lines")
				}
			}
			return true
		})
	}
	slices.Sort(long)
	for _, l := range long {
		t.Errorf("%s, over %d", l, maxLines)
	}
}
