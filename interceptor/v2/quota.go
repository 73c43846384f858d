package interceptor

import (
	"context"

	"connectrpc.com/connect/v2"

	"github.com/connectlimit/connectlimit/interceptor/v2/gen/connectlimit/v1/connectlimitv1connect"
	"github.com/connectlimit/connectlimit/limiter"
	connectlimitv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1"
)

// RegisterQuotaService registers connectlimit.v1.QuotaService on server: it
// tells callers, identified as lim identifies them, the state of every
// bucket of their tier without charging anything. It is what dashboards and
// the TypeScript client read. Register it on the server that the
// interceptor limits, so that the configuration (procedures: or
// default_bucket:) can limit it like any other procedure.
func RegisterQuotaService(server *connect.Server, lim *limiter.Limiter) {
	connectlimitv1connect.RegisterQuotaServiceHandler(server, quotaService{lim})
}

type quotaService struct{ lim *limiter.Limiter }

var _ connectlimitv1connect.QuotaServiceHandler = quotaService{}

// GetQuota implements connectlimit.v1.QuotaService.GetQuota.
func (q quotaService) GetQuota(ctx context.Context, req *connectlimitv1.GetQuotaRequest) (*connectlimitv1.GetQuotaResponse, error) {
	info, ok := connect.CallInfoForServerContext(ctx)
	if !ok {
		info = &connect.CallInfo{}
	}
	spec := info.Spec
	if spec.Procedure == "" {
		spec.Procedure = limiter.QuotaProcedure
	}
	res, err := q.lim.Quota(ctx, callInfo(spec, info), req)
	if err != nil {
		return nil, refuse(info, err)
	}
	return res, nil
}
