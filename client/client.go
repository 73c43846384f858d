// Package client is a [connect.Interceptor] for Go clients of services
// limited by connectlimit: it keeps the state of the server's buckets from
// the RateLimit headers of every response, retries denials that carry a
// google.rpc.RetryInfo after the wait they ask for, can pace calls so that
// they are not sent while they would certainly be denied, and describes
// denials for user interfaces and logs with [Describe].
//
// Install one [Interceptor] per set of credentials: the server keeps
// buckets per caller, and so does the interceptor's state.
//
//	limits, err := client.NewInterceptor(client.WithCost(aiservicev1connect.AIServiceSearchProcedure, "search", 1))
//	ai := aiservicev1connect.NewAIServiceClient(http.DefaultClient, url, connect.WithInterceptors(limits))
//
// The state, the pacing and the retry budget are package quota's, which
// the module client/v2 shares for connect-go v2 clients.
package client

import (
	"context"
	"errors"

	"connectrpc.com/connect"

	"github.com/connectlimit/connectlimit/client/quota"
)

// Interceptor is a [connect.Interceptor] for clients (it lets handler
// calls through untouched). Create one with [NewInterceptor] and install it
// with [connect.WithInterceptors] on the clients of one service or many. It
// is safe for concurrent use.
//
// For every call it:
//
//   - paces the call, if its procedure has a declared cost (see [WithCost]);
//   - records the buckets reported by the response's RateLimit,
//     RateLimit-Policy and Connectlimit-Warning headers, or by the metadata
//     of a denial or of a stream's error, for [Interceptor.Quota] and the
//     subscribers of [Interceptor.Subscribe];
//   - retries a denial with a google.rpc.RetryInfo (see [WithRetry]).
type Interceptor struct {
	tracker *quota.Tracker
}

var _ connect.Interceptor = (*Interceptor)(nil)

// NewInterceptor returns an Interceptor configured by opts. It fails only
// for an invalid option, naming it.
func NewInterceptor(opts ...Option) (*Interceptor, error) {
	var cfg config
	for _, o := range opts {
		o.apply(&cfg)
	}
	tracker, err := quota.NewTracker(cfg.quota...)
	if err != nil {
		return nil, err
	}
	return &Interceptor{tracker: tracker}, nil
}

// Quota returns the last known state of the server's bucket named bucket,
// and false if no response has reported it yet.
func (i *Interceptor) Quota(bucket string) (Quota, bool) {
	return i.tracker.Quota(bucket)
}

// Quotas returns the last known state of every bucket that responses have
// reported, sorted by name.
func (i *Interceptor) Quotas() []Quota {
	return i.tracker.Quotas()
}

// Subscribe calls f with the new state of a bucket each time a response
// reports it, starting at once with every bucket known so far (in name
// order), until the returned function is called. Calls to f are made one
// at a time and in the order the state changed, on the goroutine of a call
// that read a response (so f should be quick: hand the value to a channel
// or a UI loop). f may make calls through the interceptor, and may
// unsubscribe: updates that arrive while f runs are delivered after it
// returns. After unsubscribe returns, f is not called again, except for a
// call already running. Unsubscribing twice is harmless.
func (i *Interceptor) Subscribe(f func(Quota)) (unsubscribe func()) {
	return i.tracker.Subscribe(f)
}

// WrapUnary implements [connect.Interceptor]: it paces, observes and
// retries unary client calls.
func (i *Interceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if !req.Spec().IsClient {
			return next(ctx, req)
		}
		c := i.tracker.NewCall(req.Spec().Procedure, req.Any())
		reserved, err := c.Pace(ctx)
		if err != nil {
			return nil, contextError(err)
		}
		for {
			c.Attempt()
			res, err := next(ctx, req)
			if err == nil {
				i.tracker.Observe(res.Header(), reserved)
				return res, nil
			}
			i.tracker.Observe(errorMeta(err), reserved)
			reserved = nil
			delay, ok := retryDelay(err)
			if !ok {
				return nil, err
			}
			again, waitErr := c.Retry(ctx, delay)
			if waitErr != nil {
				return nil, contextError(waitErr)
			}
			if !again {
				return nil, err
			}
		}
	}
}

// WrapStreamingClient implements [connect.Interceptor]: it paces a stream
// before its first message, observes its headers and its error, and
// retries a server stream denied before its first message.
func (i *Interceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		return newClientStream(ctx, i, spec, next)
	}
}

// WrapStreamingHandler implements [connect.Interceptor]: handlers are not
// this interceptor's business, so it returns next.
func (*Interceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

// contextError turns the error of a wait cut short by its context into the
// error Connect gives a call whose context ended.
func contextError(err error) error {
	code := connect.CodeCanceled
	if errors.Is(err, context.DeadlineExceeded) {
		code = connect.CodeDeadlineExceeded
	}
	return connect.NewError(code, err)
}
