// Package quota is what connectlimit's Go client interceptors know of a
// server's limits, independent of connect-go's major version: a [Tracker]
// keeps the state of the server's buckets from the RateLimit header fields
// of every response, paces calls by it, and bounds the retries and waits of
// each [Call]; [DescribeDenial] reads a denial's details. It never imports
// Connect: the interceptor packages are thin adapters of it, package client
// for connect-go v1 (connectrpc.com/connect) and the module client/v2 for
// connect-go v2 (connectrpc.com/connect/v2). Most programs use those.
package quota

import (
	"time"
)

// Header names a [Tracker] reads, as a connectlimit server writes them.
// RateLimit and RateLimit-Policy follow
// draft-ietf-httpapi-ratelimit-headers-10, so any server that sends them in
// that form is understood.
const (
	// HeaderRateLimit lists each bucket's state after a call:
	// `"search";r=59;t=1` has 59 whole tokens left and is full again in 1 s.
	HeaderRateLimit = "RateLimit"
	// HeaderRateLimitPolicy lists each bucket's shape: `"search";q=60;w=60`
	// holds 60 tokens and refills from empty in 60 s.
	HeaderRateLimitPolicy = "RateLimit-Policy"
	// HeaderWarning lists the buckets a call left under the server's
	// warning fraction of their capacity: `"generate_tokens";r=800;q=10000`.
	HeaderWarning = "Connectlimit-Warning"
	// HeaderRetryAfter is the wait, in whole seconds, that a denial a wait
	// can cure carries besides its google.rpc.RetryInfo detail.
	HeaderRetryAfter = "Retry-After"
)

// Header is read access to response header fields: [net/http.Header] (the
// headers, trailers or error metadata of connect-go v1) and connect-go v2's
// *Header both have it.
type Header interface {
	Values(key string) []string
}

// Quota is the state of one of the server's buckets as the last response
// that reported it said. The server keeps buckets per caller, so a Quota
// describes the caller whose credentials the calls carried.
type Quota struct {
	// Bucket is the bucket's name, as in the server's configuration.
	Bucket string
	// Remaining is how many whole tokens the bucket held after that call
	// (RateLimit's r).
	Remaining int64
	// Capacity is how many tokens the bucket holds when full
	// (RateLimit-Policy's q); zero if the server has not said.
	Capacity int64
	// Window is how long the bucket takes to refill from empty
	// (RateLimit-Policy's w, rounded up to whole seconds by the server);
	// zero if the server has not said. The bucket refills continuously at
	// about Capacity / Window tokens per second.
	Window time.Duration
	// ResetAt is when the bucket will be full again if nobody takes from
	// it (ObservedAt plus RateLimit's t); zero if the server has not said.
	ResetAt time.Time
	// Warning reports that the response listed the bucket in
	// Connectlimit-Warning: it is below the server's warning fraction of
	// its capacity (10% by default), and calls should slow down before
	// they are denied.
	Warning bool
	// ObservedAt is when the response was read, on the tracker's clock.
	ObservedAt time.Time
}

// Cost is what a call takes from one of the server's buckets, for pacing
// (see [WithCost]).
type Cost struct {
	// Bucket names the bucket, as the server's RateLimit header does.
	Bucket string
	// Tokens is how many tokens the call takes from it, >= 0.
	Tokens float64
}

// CostFunc returns what a call to procedure (e.g.
// "/aiservice.v1.AIService/GenerateReport") with request message msg costs,
// for pacing. msg is the unary request or the first message a stream sends
// (a pointer to the generated type). It must be safe for concurrent use and
// fast: it runs before every call. Costs with an empty bucket or a negative
// or non-finite number of tokens are ignored.
type CostFunc func(procedure string, msg any) []Cost
