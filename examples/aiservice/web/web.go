// Package web serves the example AI service's browser demo, a page that
// calls aiservice.v1.AIService and connectlimit.v1.QuotaService with
// connect-web and the @connectlimit/client kit.
//
// The page is static/: index.html, style.css and app.js, the bundle that
// esbuild builds from src/ (`npm run build:demo` in clients/ts). The bundle
// is committed and embedded, so the example serves the demo with no build
// step.
package web

import (
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"io/fs"
	"net/http"
	"path"
)

//go:embed static
var static embed.FS

// contentSecurityPolicy lets the page load only its own files, and call any
// API origin: ?api= may point it at another server.
const contentSecurityPolicy = "default-src 'self'; connect-src *; img-src 'self' data:; " +
	"object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"

// Handler returns a handler that serves the demo: the page at "/", its
// script and style sheet beside it, and 404 for anything else. Mount it at
// "/" of the server that serves the API (it then calls the API on its own
// origin), or anywhere else with ?api=http://host:port in the page's URL.
// The handler is safe for concurrent use.
func Handler() http.Handler {
	files, err := fs.Sub(static, "static")
	if err != nil { // only for an invalid name, and "static" is valid
		return http.NotFoundHandler()
	}
	etags := entityTags(files)
	fileServer := http.FileServerFS(files)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", contentSecurityPolicy)
		h.Set("X-Content-Type-Options", "nosniff")
		// Embedded files have no modification time: browsers revalidate
		// each time with the content's hash instead, so a rebuilt example
		// never runs a stale script, and an unchanged one costs a 304.
		h.Set("Cache-Control", "no-cache")
		name := path.Clean(r.URL.Path)
		if name == "/" {
			name = "/index.html"
		}
		if etag, ok := etags[name]; ok {
			h.Set("ETag", etag)
		}
		fileServer.ServeHTTP(w, r)
	})
}

// entityTags returns an ETag for each file of files, by its path with a
// leading slash.
func entityTags(files fs.FS) map[string]string {
	etags := map[string]string{}
	_ = fs.WalkDir(files, ".", func(name string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := fs.ReadFile(files, name)
		if err != nil {
			return err
		}
		sum := sha256.Sum256(data)
		etags["/"+name] = `"` + hex.EncodeToString(sum[:12]) + `"`
		return nil
	})
	return etags
}
