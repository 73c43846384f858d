package client_test

import (
	"context"
	"fmt"
	"log"
	"net/http"
	"net/http/httptest"
	"time"

	"connectrpc.com/connect/v2"
	"connectrpc.com/connect/v2/connecthttp"

	"github.com/connectlimit/connectlimit/bucket/memstore"
	client "github.com/connectlimit/connectlimit/client/v2"
	"github.com/connectlimit/connectlimit/costmap"
	interceptor "github.com/connectlimit/connectlimit/interceptor/v2"
	"github.com/connectlimit/connectlimit/interceptor/v2/gen/connectlimit/v1/connectlimitv1connect"
	connectlimitv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1"
)

// exampleServer serves connectlimit.v1.QuotaService, limited to one call
// per caller every 1000 seconds, and returns its URL and a function that
// stops it.
func exampleServer() (string, func()) {
	cfg, err := costmap.ParseConfig([]byte(`
buckets:
  quota_reads: { capacity: 1, period: 1000s }
procedures:
  /connectlimit.v1.QuotaService/GetQuota: { bucket: quota_reads }
`))
	if err != nil {
		log.Fatal(err)
	}
	costs, err := costmap.New(cfg, connectlimitv1.File_connectlimit_v1_quota_proto.Services().Get(0))
	if err != nil {
		log.Fatal(err)
	}
	store := memstore.New()
	limit, limits, err := interceptor.NewServerInterceptor(store, costs)
	if err != nil {
		log.Fatal(err)
	}
	server := connect.NewServer(limit)
	interceptor.RegisterQuotaService(server, limits)
	mux := http.NewServeMux()
	connecthttp.Mount(mux, server)
	hs := httptest.NewServer(mux)
	return hs.URL, func() {
		hs.Close()
		_ = limits.Close(context.Background())
		_ = store.Close()
	}
}

func ExampleNewClientInterceptor() {
	url, stop := exampleServer()
	defer stop()

	limits, err := client.NewClientInterceptor()
	if err != nil {
		log.Fatal(err)
	}
	quota := connectlimitv1connect.NewQuotaServiceClient(connect.NewClient(
		connecthttp.NewTransport(http.DefaultClient, url), limits.ClientInterceptor()))
	ctx := context.Background()
	if _, err := quota.GetQuota(ctx, &connectlimitv1.GetQuotaRequest{}); err != nil {
		log.Fatal(err)
	}
	q, _ := limits.Quota("quota_reads")
	fmt.Printf("%s: %d of %d left\n", q.Bucket, q.Remaining, q.Capacity)

	// The next call is denied with a RetryInfo of 1000s, longer than the
	// interceptor waits (10s): it is returned at once.
	_, err = quota.GetQuota(ctx, &connectlimitv1.GetQuotaRequest{})
	if l, ok := client.Describe(err); ok {
		fmt.Printf("limited by %q as %s; try again in %v\n", l.Bucket, l.Subject, l.RetryAfter.Round(time.Minute))
	}
	// Output:
	// quota_reads: 0 of 1 left
	// limited by "quota_reads" as ip:127.0.0.1; try again in 17m0s
}
