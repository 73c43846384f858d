import { Code, ConnectError } from "@connectrpc/connect";
import { RetryInfoSchema } from "./gen/google/rpc/error_details_pb.js";

/**
 * RetryOptions bound the retries of createRateLimitInterceptor. A denied call
 * never reached its handler and changed no bucket, so retrying it is safe
 * for any method, idempotent or not.
 */
export interface RetryOptions {
  /**
   * maxAttempts is the most times one call is sent, the first included.
   * Default 3 (two retries). 1 turns retries off.
   */
  readonly maxAttempts?: number;
  /**
   * maxDelayMs is the longest RetryInfo delay worth waiting for: a denial
   * that asks for longer is returned at once, for the application to show
   * (see describeLimit). Default 10 000 (10 s).
   */
  readonly maxDelayMs?: number;
  /**
   * maxTotalDelayMs bounds the time one call spends waiting between its
   * attempts: a retry whose wait would pass it is not made. Default 20 000
   * (20 s).
   */
  readonly maxTotalDelayMs?: number;
  /**
   * jitter is the largest random extra added to a RetryInfo delay, as a
   * fraction of it, so that callers denied together do not all come back at
   * once: the wait is delay + delay × jitter × U[0, 1), the extra rounded to
   * a whole millisecond. Default 0.2.
   */
  readonly jitter?: number;
}

/** ResolvedRetry is RetryOptions with every default applied. */
export type ResolvedRetry = Required<RetryOptions>;

/** resolveRetry applies the documented defaults; false turns retries off. */
export function resolveRetry(options: RetryOptions | false | undefined): ResolvedRetry {
  if (options === false) {
    return { maxAttempts: 1, maxDelayMs: 0, maxTotalDelayMs: 0, jitter: 0 };
  }
  return {
    maxAttempts: Math.max(1, Math.floor(options?.maxAttempts ?? 3)),
    maxDelayMs: Math.max(0, options?.maxDelayMs ?? 10_000),
    maxTotalDelayMs: Math.max(0, options?.maxTotalDelayMs ?? 20_000),
    jitter: Math.max(0, options?.jitter ?? 0.2),
  };
}

/**
 * retryInfoDelayMs returns the delay of the first google.rpc.RetryInfo
 * detail of a resource_exhausted ConnectError, rounded up to whole
 * milliseconds, or undefined when there is none (no wait cures the denial:
 * a cost over capacity, a concurrency limit) or err is another error.
 */
export function retryInfoDelayMs(err: unknown): number | undefined {
  if (!(err instanceof ConnectError) || err.code !== Code.ResourceExhausted) {
    return undefined;
  }
  for (const info of err.findDetails(RetryInfoSchema)) {
    const d = info.retryDelay;
    if (d === undefined) {
      continue;
    }
    const ms = Number(d.seconds) * 1000 + d.nanos / 1e6;
    if (Number.isFinite(ms) && ms >= 0) {
      return Math.ceil(ms);
    }
  }
  return undefined;
}

/**
 * retryWaitMs decides whether a call that failed with err after `attempts`
 * attempts, having waited waitedMs between them, is retried: it returns the
 * milliseconds to wait first, or undefined to give up. Only a
 * resource_exhausted error with a RetryInfo detail is retried. random draws
 * the jitter, uniformly in [0, 1).
 */
export function retryWaitMs(
  err: unknown,
  attempts: number,
  waitedMs: number,
  options: ResolvedRetry,
  random: () => number,
): number | undefined {
  if (attempts >= options.maxAttempts) {
    return undefined;
  }
  const delay = retryInfoDelayMs(err);
  if (delay === undefined || delay > options.maxDelayMs) {
    return undefined;
  }
  const wait = delay + Math.round(delay * options.jitter * random());
  if (waitedMs + wait > options.maxTotalDelayMs) {
    return undefined;
  }
  return wait;
}
