import { Code, ConnectError } from "@connectrpc/connect";
import { QuotaFailureSchema, RetryInfoSchema } from "./gen/google/rpc/error_details_pb.js";
import { headerRetryAfter } from "./headers.js";
import { retryInfoDelayMs } from "./retry.js";

/** LimitDescription is a rate-limit denial, in the terms a UI shows. */
export interface LimitDescription {
  /**
   * bucket is the bucket (or concurrency limit) that refused the call: the
   * quota_id of the first google.rpc.QuotaFailure violation, or undefined
   * when the error has none.
   */
  readonly bucket: string | undefined;
  /**
   * subject is who was charged, as the server names it: "key:<name>",
   * "user:<id>" or "ip:<address>"; undefined when the error does not say.
   */
  readonly subject: string | undefined;
  /**
   * retryAfterMs is how long until the call can succeed, in milliseconds,
   * from the google.rpc.RetryInfo detail (exact, rounded up to whole
   * milliseconds), else from the Retry-After header (whole seconds). It is
   * undefined when no wait helps: the call costs more than the bucket can
   * ever hold, or a concurrency limit is full until another call ends.
   */
  readonly retryAfterMs: number | undefined;
  /**
   * message is the server's message without the code prefix, for example
   * `connectlimit: rate limit exceeded for bucket "search": retry in 742ms`.
   */
  readonly message: string;
}

/**
 * describeLimit describes a rate-limit denial for a UI, or returns undefined
 * when err is not one. A denial is a ConnectError with code
 * resource_exhausted that carries a google.rpc.QuotaFailure or RetryInfo
 * detail; other resource_exhausted errors (a message over the size limit,
 * say) are not denials.
 */
export function describeLimit(err: unknown): LimitDescription | undefined {
  if (!(err instanceof ConnectError) || err.code !== Code.ResourceExhausted) {
    return undefined;
  }
  const violations = err.findDetails(QuotaFailureSchema).flatMap((qf) => qf.violations);
  const hasRetryInfo = err.findDetails(RetryInfoSchema).length > 0;
  if (violations.length === 0 && !hasRetryInfo) {
    return undefined;
  }
  const first = violations[0];
  let retryAfterMs = retryInfoDelayMs(err);
  if (retryAfterMs === undefined) {
    const header = err.metadata.get(headerRetryAfter)?.trim();
    if (header !== undefined && /^\d{1,10}$/.test(header)) {
      retryAfterMs = Number(header) * 1000;
    }
  }
  return {
    bucket: first?.quotaId || undefined,
    subject: first?.subject || undefined,
    retryAfterMs,
    message: err.rawMessage,
  };
}
