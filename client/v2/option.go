package client

import (
	"time"

	"github.com/connectlimit/connectlimit/client/quota"
)

// DefaultMaxAttempts is how many times a call is sent at most, the first
// time included, unless set with [WithRetry] or [WithoutRetry]: a call
// denied with a google.rpc.RetryInfo is retried at most twice.
const DefaultMaxAttempts = quota.DefaultMaxAttempts

// DefaultMaxWait bounds the total time one call spends waiting in the
// interceptor (for retries and for pacing), unless set with [WithMaxWait].
// A denial that asks for a longer wait is returned at once: by then a user
// is better served by an error that says how long to wait (see
// [Describe]) than by a call that hangs.
const DefaultMaxWait = quota.DefaultMaxWait

// Cost is what a call takes from one of the server's buckets, for pacing
// (see [WithCost]).
type Cost = quota.Cost

// CostFunc returns what a call to procedure (e.g.
// "/aiservice.v1.AIService/GenerateReport") with request message msg costs,
// for pacing. msg is the unary request or the first message a stream sends
// (a pointer to the generated type). It must be safe for concurrent use and
// fast: it runs before every call. Costs with an empty bucket or a negative
// or non-finite number of tokens are ignored.
type CostFunc = quota.CostFunc

// Option configures an [Interceptor].
type Option interface {
	apply(*config)
}

type optionFunc func(*config)

func (f optionFunc) apply(c *config) { f(c) }

// config collects the options of the interceptor's [quota.Tracker], which
// holds the state, the pacing and the retry budget.
type config struct {
	quota []quota.Option
}

func quotaOption(o quota.Option) Option {
	return optionFunc(func(c *config) { c.quota = append(c.quota, o) })
}

// WithRetry sets how many times a call is sent at most, the first time
// included; the default is [DefaultMaxAttempts]. Only a denial with
// [connect.CodeResourceExhausted] and a google.rpc.RetryInfo detail is
// retried, after at least the RetryInfo's delay, and only while the total
// wait stays within [WithMaxWait] and before the context's deadline. A
// connectlimit server denies a call before its handler runs and charges
// nothing for it, so retrying a denial is safe even for calls that are not
// idempotent.
//
// Unary calls and server streams are retried when the denial ends them
// before their first message (which is when a connectlimit server denies
// a reservation), by sending their request again on a new stream with the
// same request headers; the call's [connect.CallInfo] then tells of the
// last attempt. Client and bidi streams are never retried: their messages
// are sent as the caller produces them, and the interceptor does not keep
// them to send again.
func WithRetry(maxAttempts int) Option { return quotaOption(quota.WithRetry(maxAttempts)) }

// WithoutRetry turns retries off: every call is sent once, and denials go
// back to the caller as they are. It is shorthand for WithRetry(1).
func WithoutRetry() Option { return WithRetry(1) }

// WithMaxWait bounds the total time one call may wait in the interceptor,
// for its retries and its pacing together; the default is
// [DefaultMaxWait]. A retry or pacing wait that would go past the bound, or
// past the context's deadline, is not started: a denial is returned as it
// is, and a paced call is sent at once for the server to decide. Zero
// turns all waiting off.
func WithMaxWait(d time.Duration) Option { return quotaOption(quota.WithMaxWait(d)) }

// WithCost declares that every call to procedure (e.g.
// "/aiservice.v1.AIService/Search") takes tokens from the server's bucket,
// which turns on pacing for it: before the call is sent, the interceptor
// estimates, from the last RateLimit and RateLimit-Policy headers it read
// for the bucket and the calls it has in flight, whether the bucket can pay,
// and if not holds the call until it can (at most [WithMaxWait]) instead of
// sending a call that will certainly be denied. Declare each bucket of a
// procedure with its own WithCost; declaring one twice adds the tokens.
//
// Pacing is an estimate: the server decides. Until a response has reported
// a bucket, and for a bucket that can never pay (tokens over its
// capacity), calls go out at once. The state is per interceptor, so calls
// that other processes make with the same credentials are seen only
// through the headers of later responses; a denial they cause is retried as
// usual (see [WithRetry]). By default no procedure is paced.
func WithCost(procedure, bucket string, tokens float64) Option {
	return quotaOption(quota.WithCost(procedure, bucket, tokens))
}

// WithCostFunc paces calls whose cost depends on their request (see
// [WithCost] for what pacing does): f's costs are added to those declared
// with WithCost. By default there is none.
func WithCostFunc(f CostFunc) Option { return quotaOption(quota.WithCostFunc(f)) }
