package interceptor

import (
	"context"
	"fmt"
	"math"
	"net/http"
	"slices"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/connectlimit/connectlimit/bucket"
	connectlimitv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1"
	"github.com/connectlimit/connectlimit/proto/connectlimit/v1/connectlimitv1connect"
)

// NewQuotaHandler returns the path and handler of connectlimit.v1.QuotaService,
// which tells callers, identified as the interceptor identifies them, the
// state of every bucket of their tier without charging anything. Mount it
// next to the limited services; it is what dashboards and the TypeScript
// client read. Pass handler options such as [connect.WithInterceptors] as
// usual.
func (i *Interceptor) NewQuotaHandler(opts ...connect.HandlerOption) (string, http.Handler) {
	return connectlimitv1connect.NewQuotaServiceHandler(quotaService{i}, opts...)
}

// quotaProcedure names GetQuota in logs.
const quotaProcedure = connectlimitv1connect.QuotaServiceGetQuotaProcedure

type quotaService struct{ i *Interceptor }

var _ connectlimitv1connect.QuotaServiceHandler = quotaService{}

// GetQuota implements connectlimit.v1.QuotaService.GetQuota.
func (q quotaService) GetQuota(ctx context.Context, req *connect.Request[connectlimitv1.GetQuotaRequest]) (*connect.Response[connectlimitv1.GetQuotaResponse], error) {
	i := q.i
	cost := req.Msg.GetCost()
	if req.Msg.Cost != nil && (math.IsNaN(cost) || math.IsInf(cost, 0) || cost < 0) {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("cost must be a finite number >= 0, got %v", cost))
	}
	id, tier, err := i.identify(ctx, req.Peer(), req.Header())
	if err != nil {
		return nil, err
	}
	names := tier.Buckets()
	if want := req.Msg.GetBuckets(); len(want) > 0 {
		for _, name := range want {
			if !slices.Contains(names, name) {
				return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("buckets: no bucket named %q", name))
			}
		}
		names = slices.Compact(slices.Sorted(slices.Values(want)))
	}
	res := &connectlimitv1.GetQuotaResponse{Subject: id.Subject(), Tier: tier.Name}
	// A zero-cost take reads without charging; a store takes at most
	// MaxCharges buckets a request.
	for chunk := range slices.Chunk(names, bucket.MaxCharges) {
		charges := make([]bucket.Charge, len(chunk))
		for k, name := range chunk {
			l, _ := tier.Limit(name)
			charges[k] = bucket.Charge{Bucket: name, Limit: l}
		}
		d, err := i.back.take(ctx, bucket.Request{Subject: id.Subject(), Charges: charges})
		if err != nil {
			if ctxErr := ctx.Err(); ctxErr != nil {
				return nil, contextError(ctxErr)
			}
			i.back.log.storeFailed(ctx, "get quota", quotaProcedure, id.Subject(), FailClosed, err)
			return nil, unavailableError()
		}
		levels := make([]float64, len(d.Buckets))
		for k, b := range d.Buckets {
			levels[k] = b.Remaining
			charges[k].Cost = cost
		}
		// What the requested cost would need, on the same levels.
		asked := bucket.Decide(bucket.Request{Subject: id.Subject(), Charges: charges}, levels)
		for k, b := range d.Buckets {
			bq := &connectlimitv1.BucketQuota{
				Name:            b.Bucket,
				Capacity:        b.Limit.Capacity,
				RefillPerSecond: b.Limit.RefillPerSecond,
				Remaining:       b.Remaining,
				ResetAfter:      durationpb.New(b.ResetAfter),
			}
			if a := asked.Buckets[k]; req.Msg.Cost != nil && !a.OverCapacity() {
				bq.RetryAfter = durationpb.New(a.RetryAfter)
			}
			res.Buckets = append(res.Buckets, bq)
		}
	}
	for _, name := range tier.ConcurrencyLimits() {
		c, _ := tier.Concurrency(name)
		res.Concurrency = append(res.Concurrency, &connectlimitv1.ConcurrencyQuota{Name: name, Limit: int32(min(c.Limit, math.MaxInt32))})
	}
	return connect.NewResponse(res), nil
}
