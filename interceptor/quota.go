package interceptor

import (
	"context"
	"net/http"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/connectlimit/connectlimit/limiter"
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

type quotaService struct{ i *Interceptor }

var _ connectlimitv1connect.QuotaServiceHandler = quotaService{}

// GetQuota implements connectlimit.v1.QuotaService.GetQuota.
func (q quotaService) GetQuota(ctx context.Context, req *connect.Request[connectlimitv1.GetQuotaRequest]) (*connect.Response[connectlimitv1.GetQuotaResponse], error) {
	res, err := q.i.lim.Quota(ctx, callInfo(req.Spec(), req.Peer(), req.Header()), req.Msg)
	if err != nil {
		return nil, connectError(err)
	}
	return connect.NewResponse(res), nil
}

// callInfo describes a call to the limiter.
func callInfo(spec connect.Spec, peer connect.Peer, header http.Header) *limiter.CallInfo {
	info := &limiter.CallInfo{
		Procedure:  spec.Procedure,
		StreamType: limiter.StreamType(spec.StreamType),
		PeerAddr:   peer.Addr,
		Protocol:   peer.Protocol,
		Header:     header,
	}
	info.Method, _ = spec.Schema.(protoreflect.MethodDescriptor)
	return info
}
