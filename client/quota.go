package client

import "github.com/connectlimit/connectlimit/client/quota"

// Header names the interceptor reads, as a connectlimit server writes them
// (see the interceptor package of this module). RateLimit and
// RateLimit-Policy follow draft-ietf-httpapi-ratelimit-headers-10, so any
// server that sends them in that form is understood.
const (
	// HeaderRateLimit lists each bucket's state after a call:
	// `"search";r=59;t=1` has 59 whole tokens left and is full again in 1 s.
	HeaderRateLimit = quota.HeaderRateLimit
	// HeaderRateLimitPolicy lists each bucket's shape: `"search";q=60;w=60`
	// holds 60 tokens and refills from empty in 60 s.
	HeaderRateLimitPolicy = quota.HeaderRateLimitPolicy
	// HeaderWarning lists the buckets a call left under the server's
	// warning fraction of their capacity: `"generate_tokens";r=800;q=10000`.
	HeaderWarning = quota.HeaderWarning
	// HeaderRetryAfter is the wait, in whole seconds, that a denial a wait
	// can cure carries besides its google.rpc.RetryInfo detail.
	HeaderRetryAfter = quota.HeaderRetryAfter
)

// Quota is the state of one of the server's buckets as the last response
// that reported it said; see [quota.Quota]. The server keeps buckets per
// caller, so a Quota describes the caller whose credentials the calls
// carried.
type Quota = quota.Quota
