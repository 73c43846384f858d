package interceptor_test

import (
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/connectlimit/connectlimit/costmap"
)

// postSearch posts body to Search with the Connect protocol's binary
// codec, bypassing the client's encoding, and returns the response with its
// body read.
func postSearch(t *testing.T, f *fixture, body string) (*http.Response, string) {
	t.Helper()
	r, err := http.NewRequestWithContext(t.Context(), http.MethodPost, f.server.URL+searchProc, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	r.Header.Set("Content-Type", "application/proto")
	res, err := f.server.Client().Do(r)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	return res, string(b)
}

// notProto is a request body that does not unmarshal: field 1 with the
// reserved wire type 7.
const notProto = "\x0f\xff\xff"

// TestGateDecidesBeforeDecoding shows that HandlerOptions' gate decides a
// fixed-cost unary call from its headers: a caller out of tokens is denied
// even when its request would not decode, and a request that does not
// decode still pays its fixed cost, as any call whose handler fails.
func TestGateDecidesBeforeDecoding(t *testing.T) {
	t.Parallel()
	f := newFixture(t, nil)
	// An undecodable request from a caller with tokens reaches the decoder
	// (invalid_argument, HTTP 400) and pays.
	res, body := postSearch(t, f, notProto)
	if res.StatusCode != http.StatusBadRequest || !strings.Contains(body, "invalid_argument") {
		t.Fatalf("undecodable request: status %d, body %s; want 400 invalid_argument", res.StatusCode, body)
	}
	ok, err := callSearch(t, f.search, "")
	if err != nil {
		t.Fatal(err)
	}
	if got := ok.Header().Get("RateLimit"); got != `"search";r=1;t=2` {
		t.Errorf("after an undecodable and a good call RateLimit = %q, want r=1: the undecodable one paid", got)
	}
	if _, err := callSearch(t, f.search, ""); err != nil {
		t.Fatal(err)
	}
	// Out of tokens: the same undecodable request is denied before its body
	// is read, with every field of a denial.
	res, body = postSearch(t, f, notProto)
	if res.StatusCode != http.StatusTooManyRequests || !strings.Contains(body, "resource_exhausted") {
		t.Fatalf("denied undecodable request: status %d, body %s; want 429 resource_exhausted", res.StatusCode, body)
	}
	if res.Header.Get("Retry-After") != "1" || res.Header.Get("RateLimit") == "" || res.Header.Get("RateLimit-Policy") == "" {
		t.Errorf("gate denial lacks its headers: %v", res.Header)
	}
}

// TestGateDenialDetailsPerProtocol checks that a denial decided by the
// gate reaches clients of every protocol with its details, and its fields
// in the response headers.
func TestGateDenialDetailsPerProtocol(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		opts []connect.ClientOption
	}{
		{"connect", nil},
		{"grpc", []connect.ClientOption{connect.WithGRPC()}},
		{"grpcweb", []connect.ClientOption{connect.WithGRPCWeb()}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t, nil)
			c := connect.NewClient[req, resp](f.server.Client(), f.server.URL+searchProc, tc.opts...)
			for range 3 {
				if _, err := callSearch(t, c, "user:ann"); err != nil {
					t.Fatal(err)
				}
			}
			_, err := callSearch(t, c, "user:ann")
			ce, ri, qf := denial(t, err)
			if ri == nil || ri.GetRetryDelay().AsDuration() != time.Second {
				t.Errorf("RetryInfo = %v, want 1s", ri)
			}
			if qf == nil || len(qf.GetViolations()) != 1 || qf.GetViolations()[0].GetSubject() != "user:ann" {
				t.Errorf("QuotaFailure = %v", qf)
			}
			if ce.Meta().Get("Retry-After") != "1" || ce.Meta().Get("RateLimit") == "" {
				t.Errorf("denial headers: %v", ce.Meta())
			}
		})
	}
}

// TestGateReleasesSlotOfUndecodableCall shows that a unary call the gate
// started, whose request then fails to decode before the interceptor runs,
// still releases its concurrency slot.
func TestGateReleasesSlotOfUndecodableCall(t *testing.T) {
	t.Parallel()
	cfg := testConfig()
	cfg.Concurrency = map[string]costmap.ConcurrencyConfig{"one": {Limit: 1}}
	cfg.Procedures = map[string]costmap.ProcedureConfig{searchProc: {Bucket: "search", Concurrency: "one"}}
	f := newFixtureConfig(t, cfg, nil)
	if res, body := postSearch(t, f, notProto); res.StatusCode != http.StatusBadRequest {
		t.Fatalf("undecodable request: status %d, body %s; want 400", res.StatusCode, body)
	}
	// The slot is released when the request's context ends, just after
	// its response: wait for it rather than race it.
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err := f.search.CallUnary(t.Context(), connect.NewRequest(wrapperspb.String("q")))
		if err == nil {
			return
		}
		var ce *connect.Error
		if !errors.As(err, &ce) || ce.Code() != connect.CodeResourceExhausted || time.Now().After(deadline) {
			t.Fatalf("the undecodable call kept its slot: %v", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
