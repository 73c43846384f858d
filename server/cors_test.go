package server_test

import (
	"net/http"
	"strings"
	"testing"
)

// TestCORS checks that a page on an allowed origin may call the server
// with connect-web (the preflight allows Connect's headers and
// Authorization) and read the limiter's headers, and that other origins
// get no CORS grant.
func TestCORS(t *testing.T) {
	t.Parallel()
	url := serveYAML(t, validYAML+"cors:\n  allowed_origins: [\"https://app.example.com\"]\n")
	preflight := func(origin string) *http.Response {
		req, err := http.NewRequestWithContext(t.Context(), http.MethodOptions, url, nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Origin", origin)
		req.Header.Set("Access-Control-Request-Method", "POST")
		req.Header.Set("Access-Control-Request-Headers", "authorization,connect-protocol-version,content-type") // as browsers send it: sorted, lower case
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_ = res.Body.Close()
		return res
	}
	res := preflight("https://app.example.com")
	if res.StatusCode/100 != 2 || res.Header.Get("Access-Control-Allow-Origin") != "https://app.example.com" {
		t.Fatalf("preflight from an allowed origin: %s %v", res.Status, res.Header)
	}
	allowed := strings.ToLower(res.Header.Get("Access-Control-Allow-Headers"))
	for _, h := range []string{"content-type", "connect-protocol-version", "authorization"} {
		if !strings.Contains(allowed, h) {
			t.Errorf("preflight allows headers %q, not %s", allowed, h)
		}
	}
	if got := preflight("https://evil.example.com").Header.Get("Access-Control-Allow-Origin"); got != "" {
		t.Fatalf("preflight from another origin: Access-Control-Allow-Origin %q", got)
	}

	req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, url, strings.NewReader(`"q"`))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Origin", "https://app.example.com")
	req.Header.Set("Content-Type", "application/json")
	res, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_ = res.Body.Close()
	if res.StatusCode != http.StatusOK || res.Header.Get("RateLimit") == "" {
		t.Fatalf("call from an allowed origin: %s %v", res.Status, res.Header)
	}
	exposed := strings.ToLower(res.Header.Get("Access-Control-Expose-Headers"))
	for _, h := range []string{"ratelimit", "ratelimit-policy", "retry-after", "connectlimit-warning", "grpc-status"} {
		if !strings.Contains(exposed, h) {
			t.Errorf("Access-Control-Expose-Headers %q does not expose %s", exposed, h)
		}
	}
}

func TestCORSConfigErrors(t *testing.T) {
	t.Parallel()
	for _, origin := range []string{"app.example.com", "https://app.example.com/", "ftp://x", "https://app.example.com/path", "https://"} {
		if _, err := parse(validYAML + "cors:\n  allowed_origins: [\"" + origin + "\"]\n"); err == nil || !strings.Contains(err.Error(), "cors.allowed_origins[0]") || !strings.Contains(err.Error(), origin) {
			t.Errorf("origin %q: err = %v, want one naming cors.allowed_origins[0] and the value", origin, err)
		}
	}
}
