package server_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// TestGRPCClientSeesDenialHeaders calls the server with grpc-go, as gRPC
// clients do: a denial is codes.ResourceExhausted with a RetryInfo detail,
// and its Retry-After and RateLimit fields arrive as response headers
// (grpc.Header), where HTTP clients and proxies look, not only as
// trailers.
func TestGRPCClientSeesDenialHeaders(t *testing.T) {
	t.Parallel()
	addr := strings.TrimSuffix(strings.TrimPrefix(serveYAML(t, validYAML), "http://"), "/test.v1.TestService/Search")
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	call := func() (metadata.MD, metadata.MD, error) {
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		var header, trailer metadata.MD
		err := conn.Invoke(ctx, "/test.v1.TestService/Search", wrapperspb.String("q"), new(wrapperspb.StringValue),
			grpc.Header(&header), grpc.Trailer(&trailer))
		return header, trailer, err
	}
	for i := range 2 {
		header, _, err := call()
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		if len(header.Get("ratelimit")) == 0 {
			t.Errorf("call %d: no RateLimit header in %v", i, header)
		}
	}
	header, trailer, err := call()
	st := status.Convert(err)
	if st.Code() != codes.ResourceExhausted {
		t.Fatalf("third call: %v, want ResourceExhausted", err)
	}
	var retry *errdetails.RetryInfo
	for _, d := range st.Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok {
			retry = ri
		}
	}
	if retry.GetRetryDelay().AsDuration() <= 0 {
		t.Errorf("denial details %v: want a RetryInfo", st.Details())
	}
	for _, name := range []string{"retry-after", "ratelimit", "ratelimit-policy"} {
		if len(header.Get(name)) == 0 {
			t.Errorf("denial: %s is not in the response headers %v (trailers %v)", name, header, trailer)
		}
	}
	if ra := header.Get("retry-after"); len(ra) != 1 || strings.Trim(ra[0], "0123456789") != "" || ra[0] == "0" {
		t.Errorf("Retry-After %q, want whole seconds", ra)
	}
}
