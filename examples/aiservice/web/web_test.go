package web_test

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/connectlimit/connectlimit/examples/aiservice/web"
)

func TestHandler(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(web.Handler())
	t.Cleanup(srv.Close)
	for _, tc := range []struct {
		name            string
		path            string
		wantStatus      int
		wantContentType string
		wantBody        string
	}{
		{name: "page", path: "/", wantStatus: http.StatusOK, wantContentType: "text/html", wantBody: `<script type="module" src="app.js">`},
		{name: "script", path: "/app.js", wantStatus: http.StatusOK, wantContentType: "text/javascript", wantBody: "generateReport"},
		{name: "style", path: "/style.css", wantStatus: http.StatusOK, wantContentType: "text/css", wantBody: ":focus-visible"},
		{name: "index.html", path: "/index.html", wantStatus: http.StatusOK, wantContentType: "text/html", wantBody: "<title>"},
		{name: "unknown", path: "/nope.js", wantStatus: http.StatusNotFound},
		{name: "sources are not served", path: "/src/main.ts", wantStatus: http.StatusNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, srv.URL+tc.path, nil)
			if err != nil {
				t.Fatal(err)
			}
			res, err := srv.Client().Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer res.Body.Close()
			body, err := io.ReadAll(res.Body)
			if err != nil {
				t.Fatal(err)
			}
			if res.StatusCode != tc.wantStatus {
				t.Fatalf("status %d, want %d", res.StatusCode, tc.wantStatus)
			}
			if ct := res.Header.Get("Content-Type"); !strings.HasPrefix(ct, tc.wantContentType) {
				t.Errorf("Content-Type %q, want %q", ct, tc.wantContentType)
			}
			if !strings.Contains(string(body), tc.wantBody) {
				t.Errorf("body does not contain %q", tc.wantBody)
			}
			if csp := res.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'self'") {
				t.Errorf("Content-Security-Policy %q, want default-src 'self'", csp)
			}
		})
	}
}

func TestHandlerRevalidates(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(web.Handler())
	t.Cleanup(srv.Close)
	get := func(etag string) *http.Response {
		t.Helper()
		req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, srv.URL+"/app.js", nil)
		if err != nil {
			t.Fatal(err)
		}
		if etag != "" {
			req.Header.Set("If-None-Match", etag)
		}
		res, err := srv.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		return res
	}
	first := get("")
	etag := first.Header.Get("ETag")
	if first.StatusCode != http.StatusOK || etag == "" || first.Header.Get("Cache-Control") != "no-cache" {
		t.Fatalf("first GET: status %d, ETag %q, Cache-Control %q; want 200, an ETag, no-cache",
			first.StatusCode, etag, first.Header.Get("Cache-Control"))
	}
	if again := get(etag); again.StatusCode != http.StatusNotModified {
		t.Errorf("GET with If-None-Match: status %d, want 304", again.StatusCode)
	}
}
