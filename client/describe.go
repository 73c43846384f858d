package client

import (
	"errors"
	"net/http"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"github.com/connectlimit/connectlimit/client/quota"
)

// Limit describes a call denied for a rate or concurrency limit, for user
// interfaces and logs (see [Describe] and [quota.Limit]): the bucket, the
// subject, how long until the call can be allowed, and the message.
type Limit = quota.Limit

// Describe reports whether err (or an error it wraps) is a
// [connect.CodeResourceExhausted] error, and if so describes it from its
// details and metadata. It is safe for concurrent use.
func Describe(err error) (Limit, bool) {
	var ce *connect.Error
	if !errors.As(err, &ce) || ce.Code() != connect.CodeResourceExhausted {
		return Limit{}, false
	}
	return quota.DescribeDenial(ce.Message(), details(ce), ce.Meta()), true
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
		if v, err := d.Value(); err == nil {
			out = append(out, v)
		}
	}
	return out
}

// errorMeta returns the metadata of a Connect error: for a client, the
// union of the response's headers and trailers. It is nil for other
// errors.
func errorMeta(err error) http.Header {
	var ce *connect.Error
	if !errors.As(err, &ce) {
		return nil
	}
	return ce.Meta()
}
