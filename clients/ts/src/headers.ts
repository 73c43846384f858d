/**
 * RateLimit lists each bucket's state after a call, as
 * `"name";r=<whole tokens remaining>;t=<seconds until full>`
 * (draft-ietf-httpapi-ratelimit-headers-10).
 */
export const headerRateLimit = "RateLimit";

/**
 * RateLimit-Policy lists each bucket a call drew from, as
 * `"name";q=<capacity>;w=<seconds to refill from empty>`
 * (draft-ietf-httpapi-ratelimit-headers-10).
 */
export const headerRateLimitPolicy = "RateLimit-Policy";

/**
 * Retry-After is set on denials that a wait can cure: whole seconds, rounded
 * up. The google.rpc.RetryInfo detail of the same error is exact.
 */
export const headerRetryAfter = "Retry-After";

/**
 * Connectlimit-Warning lists, on an allowed call, the buckets left below the
 * server's warning fraction of their capacity (10% unless the server sets
 * another), as `"name";r=<whole tokens remaining>;q=<capacity>`. It is absent
 * when no bucket is low.
 */
export const headerWarning = "Connectlimit-Warning";

/**
 * headerNames lists every response header a connectlimit server may set, in
 * the order of the Go `interceptor.HeaderNames()`. A server that browser code
 * on another origin calls must list them in CORS's
 * Access-Control-Expose-Headers, or the browser hides them from this kit.
 */
export const headerNames: readonly string[] = Object.freeze([
  headerRateLimit,
  headerRateLimitPolicy,
  headerRetryAfter,
  headerWarning,
]);
