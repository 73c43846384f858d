package interceptor_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/connectlimit/connectlimit/bucket/memstore"
	"github.com/connectlimit/connectlimit/costmap"
	"github.com/connectlimit/connectlimit/interceptor"
)

// BenchmarkUnary measures what the interceptor adds to a unary call, side
// by side: the same handler served by connect-go without it, with it
// (HandlerOptions: gate and interceptor), and with it on a caller that is
// denied, over a memstore whose buckets never run out (or always have).
// Calls go through the handler's ServeHTTP in process, so the figure is
// connect-go's work plus the limiter's, with no network.
//
//	go test -run '^$' -bench BenchmarkUnary -benchmem -count 6 ./interceptor
func BenchmarkUnary(b *testing.B) {
	svc := testService(b)
	search := svc.Methods().ByName("Search")
	echo := func(_ context.Context, r *connect.Request[req]) (*connect.Response[resp], error) {
		return connect.NewResponse(wrapperspb.String(r.Msg.GetValue())), nil
	}
	for _, tc := range []struct {
		name     string
		limited  bool
		capacity float64
	}{
		{"without", false, 0},
		{"with", true, 1e12},
		{"denied", true, 1},
	} {
		b.Run(tc.name, func(b *testing.B) {
			opts := []connect.HandlerOption{connect.WithSchema(search)}
			if tc.limited {
				store := memstore.New()
				b.Cleanup(func() { _ = store.Close() })
				costs, err := costmap.New(costmap.Config{Buckets: map[string]costmap.BucketConfig{
					"search":   {Capacity: tc.capacity, RefillPerSecond: 1e-6},
					"generate": {Capacity: 100, RefillPerSecond: 1},
				}}, svc)
				if err != nil {
					b.Fatal(err)
				}
				ic, err := interceptor.NewInterceptor(store, costs)
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { _ = ic.Close(context.Background()) })
				opts = append(opts, ic.HandlerOptions())
			}
			h := connect.NewUnaryHandler(searchProc, echo, opts...)
			call := func() *httptest.ResponseRecorder {
				const body = "\x0a\x01q" // StringValue{value: "q"}
				r := httptest.NewRequest(http.MethodPost, searchProc, strings.NewReader(body))
				r.Header.Set("Content-Type", "application/proto")
				r.RemoteAddr = "192.0.2.1:1234"
				w := httptest.NewRecorder()
				h.ServeHTTP(w, r)
				return w
			}
			want := http.StatusOK
			if tc.capacity == 1 {
				call() // spends the only token
				want = http.StatusTooManyRequests
			}
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if w := call(); w.Code != want {
						b.Errorf("status %d, want %d: %s", w.Code, want, w.Body)
						return
					}
				}
			})
		})
	}
}
