package interceptor_test

import (
	"context"
	"fmt"
	"log"
	"net/http"
	"net/http/httptest"

	"connectrpc.com/connect/v2"
	"connectrpc.com/connect/v2/connecthttp"

	"github.com/connectlimit/connectlimit/bucket/memstore"
	"github.com/connectlimit/connectlimit/costmap"
	interceptor "github.com/connectlimit/connectlimit/interceptor/v2"
	"github.com/connectlimit/connectlimit/interceptor/v2/gen/connectlimit/v1/connectlimitv1connect"
	connectlimitv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1"
)

// The example limits the quota service itself, through the configuration
// (procedures: limits methods you cannot annotate): a caller may ask twice,
// then once a second.
const exampleConfig = `
buckets:
  quota_reads: { capacity: 2, refill_per_second: 1 }
procedures:
  /connectlimit.v1.QuotaService/GetQuota: { bucket: quota_reads }
`

func ExampleNewServerInterceptor() {
	cfg, err := costmap.ParseConfig([]byte(exampleConfig))
	if err != nil {
		log.Fatal(err)
	}
	costs, err := costmap.New(cfg, connectlimitv1.File_connectlimit_v1_quota_proto.Services().Get(0))
	if err != nil {
		log.Fatal(err)
	}
	store := memstore.New() // buckets in this process
	defer store.Close()
	limit, limits, err := interceptor.NewServerInterceptor(store, costs)
	if err != nil {
		log.Fatal(err)
	}
	defer limits.Close(context.Background()) // flushes settlements still queued

	server := connect.NewServer(limit) // limits every service registered on it
	interceptor.RegisterQuotaService(server, limits)
	mux := http.NewServeMux()
	connecthttp.Mount(mux, server)
	hs := httptest.NewServer(mux)
	defer hs.Close()

	quota := connectlimitv1connect.NewQuotaServiceClient(connect.NewClient(connecthttp.NewTransport(hs.Client(), hs.URL)))
	for range 3 {
		ctx, info := connect.NewClientContext(context.Background())
		_, err := quota.GetQuota(ctx, &connectlimitv1.GetQuotaRequest{})
		if err != nil {
			// connect-go v2 errors carry no metadata: the fields are in
			// the response headers.
			fmt.Println(connect.CodeOf(err), "Retry-After:", info.ResponseHeader().Get("Retry-After"))
			continue
		}
		fmt.Println("RateLimit:", info.ResponseHeader().Get("RateLimit"))
	}
	// Output:
	// RateLimit: "quota_reads";r=1;t=1
	// RateLimit: "quota_reads";r=0;t=2
	// resource_exhausted Retry-After: 1
}
