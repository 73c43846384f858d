package layering

import (
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

const module = "github.com/connectlimit/connectlimit"

// allowed lists, for each package directory (relative to the module root),
// the imports its non-test files may use besides the standard library. A package not listed
// may import anything except what forbiddenEverywhere names.
var allowed = map[string][]string{
	"bucket":            {},
	"bucket/memstore":   {module + "/bucket"},
	"bucket/breaker":    {module + "/bucket"},
	"bucket/denycache":  {module + "/bucket"},
	"bucket/buckettest": {module + "/bucket"},
	"bucket/redisstore": {module + "/bucket", "github.com/redis/go-redis/v9"},
	"costmap":           {module + "/bucket", module + "/proto/connectlimit/v1", "google.golang.org/protobuf/", "go.yaml.in/yaml/v3", "cel.dev/cel-go/"},
	// limiter is the accounting both connect-go majors share: no connect.
	"limiter": {
		module + "/bucket", module + "/bucket/breaker", module + "/bucket/denycache", module + "/costmap", module + "/proto/connectlimit/v1",
		"google.golang.org/genproto/googleapis/rpc/errdetails", "google.golang.org/genproto/googleapis/rpc/code", "google.golang.org/protobuf/",
	},
	"interceptor": {
		module + "/bucket", module + "/costmap", module + "/limiter", module + "/proto/connectlimit/v1", module + "/proto/connectlimit/v1/connectlimitv1connect",
		"connectrpc.com/connect", "connectrpc.com/authn", "google.golang.org/protobuf/",
	},
	// The Go client kit: the client interceptor reads what servers send,
	// and knows no store; the outbound limiter takes its store from the
	// caller, and knows no Connect.
	"client": {
		module + "/bucket", module + "/client/quota",
		"connectrpc.com/connect", "google.golang.org/genproto/googleapis/rpc/errdetails", "google.golang.org/protobuf/",
	},
	// quota is what the client interceptors of both connect-go majors
	// share (client for v1, the module client/v2 for v2): no connect.
	"client/quota": {
		module + "/client/internal/hook",
		"google.golang.org/genproto/googleapis/rpc/errdetails", "google.golang.org/protobuf/",
	},
	"client/internal/hook":       {},
	"client/internal/clienttest": {module + "/client/internal/hook", module + "/client/quota", module + "/internal/fakeclock"},
	"outbound":                   {module + "/bucket"},
}

func TestImportDirection(t *testing.T) {
	t.Parallel()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	checked := 0
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if name := d.Name(); path != root && (strings.HasPrefix(name, ".") || name == "node_modules" || name == "tools") {
				return filepath.SkipDir
			}
			// A directory with a go.mod of its own is another module
			// (interceptor/v2, internal/conformance): not this one's.
			if _, err := os.Stat(filepath.Join(path, "go.mod")); path != root && err == nil {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		rel, _ := filepath.Rel(root, filepath.Dir(path))
		rel = filepath.ToSlash(rel)
		f, err := parser.ParseFile(fset, path, nil, parser.ImportsOnly)
		if err != nil {
			return err
		}
		checked++
		for _, spec := range f.Imports {
			imp, _ := strconv.Unquote(spec.Path.Value)
			if problem := check(rel, imp); problem != "" {
				t.Errorf("%s imports %s: %s", filepath.ToSlash(path[len(root)+1:]), imp, problem)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if checked < 20 {
		t.Fatalf("checked only %d files: is the walk rooted at the module?", checked)
	}
}

// check returns why package dir may not import imp, or "".
func check(dir, imp string) string {
	ours := strings.HasPrefix(imp, module+"/")
	switch {
	case ours && strings.HasPrefix(imp, module+"/internal/") && !strings.HasPrefix(dir, "internal/") && !strings.Contains(dir, "/internal/"):
		// The test harnesses under internal/ may build on one another,
		// and on those of the module's root internal/.
		return "only tests, bench/ and internal/ may import internal/"
	case ours && strings.HasPrefix(imp, module+"/examples/") && !strings.HasPrefix(dir, "examples/"):
		return "nothing outside the examples imports them"
	case ours && imp == module+"/server" && !strings.HasPrefix(dir, "examples/") && dir != "bench":
		return "only examples and bench/ assemble with server"
	}
	list, ok := allowed[dir]
	if !ok {
		return ""
	}
	if !strings.Contains(strings.Split(imp, "/")[0], ".") {
		return "" // standard library
	}
	// An entry ending in "/" allows a tree of packages; others one package.
	if slices.ContainsFunc(list, func(entry string) bool {
		return imp == entry || (strings.HasSuffix(entry, "/") && strings.HasPrefix(imp, entry))
	}) {
		return ""
	}
	return "not in " + dir + "'s allowed imports (see internal/layering)"
}

func TestCheck(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		dir, imp string
		wantOK   bool
	}{
		{"bucket", "context", true},
		{"bucket", module + "/costmap", false},
		{"bucket/memstore", module + "/bucket", true},
		{"costmap", "connectrpc.com/connect", false},
		{"costmap", "google.golang.org/protobuf/proto", true},
		{"interceptor", module + "/bucket/memstore", false},
		{"interceptor", module + "/bucket/redisstore", false},
		{"interceptor", "github.com/redis/go-redis/v9", false},
		{"interceptor", module + "/costmap", true},
		{"server", module + "/bucket/redisstore", true},
		{"server", module + "/internal/redistest", false},
		{"examples/aiservice", module + "/server", true},
		{"examples/aiservice", module + "/internal/prototest", false},
		{"interceptor", module + "/server", false},
		{"client", "connectrpc.com/connect", true},
		{"client", "google.golang.org/genproto/googleapis/rpc/errdetails", true},
		{"client", module + "/interceptor", false},
		{"client", module + "/server", false},
		{"client", module + "/internal/redistest", false},
		{"client", module + "/bucket/memstore", false},
		{"client", module + "/client/quota", true},
		{"client/quota", "connectrpc.com/connect", false},
		{"client/quota", "connectrpc.com/connect/v2", false},
		{"client/quota", module + "/client/internal/hook", true},
		{"client/quota", "google.golang.org/genproto/googleapis/rpc/errdetails", true},
		{"client/internal/hook", "connectrpc.com/connect", false},
		{"internal/redistest", module + "/internal/freeport", true},
		{"bucket/memstore", module + "/internal/freeport", false},
		{"outbound", module + "/bucket", true},
		{"outbound", module + "/bucket/memstore", false},
		{"outbound", module + "/bucket/redisstore", false},
		{"outbound", "github.com/redis/go-redis/v9", false},
		{"outbound", "connectrpc.com/connect", false},
		{"outbound", module + "/client", false},
	} {
		if got := check(tc.dir, tc.imp) == ""; got != tc.wantOK {
			t.Errorf("check(%q, %q) ok = %v, want %v", tc.dir, tc.imp, got, tc.wantOK)
		}
	}
}
