/**
 * @connectlimit/client is the browser and Node client kit for services rate
 * limited by connectlimit, for connect-es v2 transports (connect-web,
 * connect-node):
 *
 * - {@link createQuotaState}: an observable per-bucket quota state for UIs;
 * - {@link createRateLimitInterceptor}: fills the state from every response,
 *   retries denials that carry google.rpc.RetryInfo, and can pace calls;
 * - {@link describeLimit}: a denial, in the terms a UI shows;
 * - {@link headerNames}: the response headers a server must expose to
 *   cross-origin browser code.
 *
 * @packageDocumentation
 */
export { describeLimit, type LimitDescription } from "./describe.js";
export { headerNames, headerRateLimit, headerRateLimitPolicy, headerRetryAfter, headerWarning } from "./headers.js";
export {
  createRateLimitInterceptor,
  type HoldEvent,
  type PacingOptions,
  type RateLimitInterceptorOptions,
  type RetryEvent,
} from "./interceptor.js";
export { chargesKey, estimateRemaining, type Charge } from "./pacing.js";
export type { RetryOptions } from "./retry.js";
export { createQuotaState, type BucketState, type QuotaListener, type QuotaState } from "./state.js";
