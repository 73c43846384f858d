package client

import (
	"errors"
	"time"

	"connectrpc.com/connect/v2"
	"connectrpc.com/connect/v2/connectproto"
	"google.golang.org/protobuf/proto"

	"github.com/connectlimit/connectlimit/client/quota"
)

// Limit describes a call denied for a rate or concurrency limit, for user
// interfaces and logs (see [Describe] and [quota.Limit]): the bucket, the
// subject, how long until the call can be allowed, and the message.
type Limit = quota.Limit

// Describe reports whether err (or an error it wraps) is a
// [connect.CodeResourceExhausted] error, and if so describes it from its
// details: the google.rpc.QuotaFailure names the bucket and the subject,
// the google.rpc.RetryInfo the wait. connect-go v2 errors carry no
// metadata, so a Retry-After header without a RetryInfo (which a
// connectlimit server never sends) is not read: it is in the call's
// [connect.CallInfo], for [quota.DescribeDenial]. It is safe for concurrent
// use.
func Describe(err error) (Limit, bool) {
	var ce *connect.Error
	if !errors.As(err, &ce) || ce.Code() != connect.CodeResourceExhausted {
		return Limit{}, false
	}
	return quota.DescribeDenial(ce.Message(), details(ce), nil), true
}

// retryDelay returns the google.rpc.RetryInfo delay of a
// [connect.CodeResourceExhausted] error: the only denials worth retrying.
func retryDelay(err error) (time.Duration, bool) {
	var ce *connect.Error
	if !errors.As(err, &ce) || ce.Code() != connect.CodeResourceExhausted {
		return 0, false
	}
	return quota.RetryDelay(details(ce))
}

// details returns ce's details that decode.
func details(ce *connect.Error) []proto.Message {
	var out []proto.Message
	for _, d := range ce.Details() {
		if v, err := connectproto.UnmarshalErrorDetail(d); err == nil {
			out = append(out, v)
		}
	}
	return out
}
