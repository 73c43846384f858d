package limiter

import (
	"context"
	"fmt"
	"math"
	"slices"

	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/connectlimit/connectlimit/bucket"
	connectlimitv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1"
)

// QuotaProcedure names connectlimit.v1.QuotaService/GetQuota.
const QuotaProcedure = "/connectlimit.v1.QuotaService/GetQuota"

// Quota answers connectlimit.v1.QuotaService.GetQuota for the caller that
// info describes, identified as calls are: the state of every bucket of its
// tier (or of those req names), without charging anything, and its
// concurrency limits. The interceptor packages serve it as a Connect
// handler. Errors are *[Error]s (invalid_argument for a bad request,
// unavailable when the store fails).
func (l *Limiter) Quota(ctx context.Context, info *CallInfo, req *connectlimitv1.GetQuotaRequest) (*connectlimitv1.GetQuotaResponse, error) {
	i := l
	cost := req.GetCost()
	if req.Cost != nil && (math.IsNaN(cost) || math.IsInf(cost, 0) || cost < 0) {
		return nil, newError(code.Code_INVALID_ARGUMENT, fmt.Sprintf("cost must be a finite number >= 0, got %v", cost))
	}
	id, tier, err := i.identify(ctx, info)
	if err != nil {
		return nil, err
	}
	names := tier.Buckets()
	if want := req.GetBuckets(); len(want) > 0 {
		for _, name := range want {
			if !slices.Contains(names, name) {
				return nil, newError(code.Code_INVALID_ARGUMENT, fmt.Sprintf("buckets: no bucket named %q", name))
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
			i.back.log.storeFailed(ctx, "get quota", QuotaProcedure, id.Subject(), FailClosed, err)
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
			if a := asked.Buckets[k]; req.Cost != nil && !a.OverCapacity() {
				bq.RetryAfter = durationpb.New(a.RetryAfter)
			}
			res.Buckets = append(res.Buckets, bq)
		}
	}
	for _, name := range tier.ConcurrencyLimits() {
		c, _ := tier.Concurrency(name)
		res.Concurrency = append(res.Concurrency, &connectlimitv1.ConcurrencyQuota{Name: name, Limit: int32(min(c.Limit, math.MaxInt32))})
	}
	return res, nil
}
