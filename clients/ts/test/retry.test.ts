import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { create, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { QuotaFailureSchema, RetryInfoSchema } from "../src/gen/google/rpc/error_details_pb.js";
import { describeLimit, headerNames } from "../src/index.js";
import { resolveRetry, retryInfoDelayMs, retryWaitMs } from "../src/retry.js";

// denial builds a ConnectError as a connectlimit server sends it, with its
// details encoded as they arrive from the wire.
function denial(opts: { retryMs?: number; bucket?: string; code?: Code; retryAfter?: string } = {}): ConnectError {
  const details: { type: string; value: Uint8Array }[] = [];
  if (opts.retryMs !== undefined) {
    const seconds = Math.floor(opts.retryMs / 1000);
    const info = create(RetryInfoSchema, {
      retryDelay: { seconds: BigInt(seconds), nanos: Math.round((opts.retryMs - seconds * 1000) * 1e6) },
    });
    details.push({ type: RetryInfoSchema.typeName, value: toBinary(RetryInfoSchema, info) });
  }
  if (opts.bucket !== undefined) {
    const qf = create(QuotaFailureSchema, {
      violations: [{ subject: "key:alice-demo", quotaId: opts.bucket, description: `bucket "${opts.bucket}": …` }],
    });
    details.push({ type: QuotaFailureSchema.typeName, value: toBinary(QuotaFailureSchema, qf) });
  }
  const metadata = new Headers();
  if (opts.retryAfter !== undefined) {
    metadata.set("Retry-After", opts.retryAfter);
  }
  const err = new ConnectError(
    `connectlimit: rate limit exceeded for bucket "${opts.bucket ?? "?"}"`,
    opts.code ?? Code.ResourceExhausted,
    metadata,
  );
  err.details.push(...details);
  return err;
}

test("header names match interceptor.HeaderNames() of the Go server", () => {
  assert.deepEqual(headerNames, ["RateLimit", "RateLimit-Policy", "Retry-After", "Connectlimit-Warning"]);
});

describe("retryInfoDelayMs", () => {
  const cases: { name: string; err: unknown; want: number | undefined }[] = [
    { name: "RetryInfo in ms, rounded up", err: denial({ retryMs: 741.2, bucket: "search" }), want: 742 },
    { name: "seconds and nanos", err: denial({ retryMs: 359_999.622466 }), want: 360_000 },
    { name: "no RetryInfo", err: denial({ bucket: "generate_tokens" }), want: undefined },
    { name: "another code", err: denial({ retryMs: 100, code: Code.Unavailable }), want: undefined },
    {
      name: "outgoing detail",
      err: new ConnectError("x", Code.ResourceExhausted, undefined, [{ desc: RetryInfoSchema, value: { retryDelay: { seconds: 2n } } }]),
      want: 2000,
    },
    { name: "not a ConnectError", err: new Error("boom"), want: undefined },
    { name: "not an error", err: "resource_exhausted", want: undefined },
  ];
  for (const tc of cases) {
    test(tc.name, () => assert.equal(retryInfoDelayMs(tc.err), tc.want));
  }
});

describe("retryWaitMs", () => {
  const defaults = resolveRetry(undefined);
  const cases: {
    name: string;
    err: unknown;
    attempts: number;
    waited: number;
    options?: Parameters<typeof resolveRetry>[0];
    random?: number;
    want: number | undefined;
  }[] = [
    { name: "RetryInfo: wait its delay", err: denial({ retryMs: 500 }), attempts: 1, waited: 0, random: 0, want: 500 },
    { name: "plus jitter", err: denial({ retryMs: 500 }), attempts: 1, waited: 0, random: 0.5, want: 550 },
    { name: "jitter is at most 20%", err: denial({ retryMs: 500 }), attempts: 1, waited: 0, random: 0.999999, want: 600 },
    { name: "a second retry", err: denial({ retryMs: 500 }), attempts: 2, waited: 500, random: 0, want: 500 },
    { name: "attempts exhausted", err: denial({ retryMs: 500 }), attempts: 3, waited: 1000, want: undefined },
    { name: "no RetryInfo: cost over capacity", err: denial({ bucket: "generate_tokens" }), attempts: 1, waited: 0, want: undefined },
    { name: "no RetryInfo: concurrency", err: denial({ bucket: "generate_streams" }), attempts: 1, waited: 0, want: undefined },
    { name: "delay over maxDelayMs", err: denial({ retryMs: 10_001 }), attempts: 1, waited: 0, random: 0, want: undefined },
    { name: "delay at maxDelayMs", err: denial({ retryMs: 10_000 }), attempts: 1, waited: 0, random: 0, want: 10_000 },
    { name: "total wait over budget", err: denial({ retryMs: 6000 }), attempts: 2, waited: 15_000, random: 0, want: undefined },
    { name: "another code", err: denial({ retryMs: 100, code: Code.Unavailable }), attempts: 1, waited: 0, want: undefined },
    { name: "canceled", err: new ConnectError("canceled", Code.Canceled), attempts: 1, waited: 0, want: undefined },
    { name: "retries off", err: denial({ retryMs: 1 }), attempts: 1, waited: 0, options: false, want: undefined },
    {
      name: "custom bounds",
      err: denial({ retryMs: 30_000 }),
      attempts: 4,
      waited: 0,
      options: { maxAttempts: 5, maxDelayMs: 60_000, maxTotalDelayMs: 60_000, jitter: 0 },
      random: 0.9,
      want: 30_000,
    },
  ];
  for (const tc of cases) {
    test(tc.name, () => {
      const options = tc.options === undefined ? defaults : resolveRetry(tc.options);
      assert.equal(retryWaitMs(tc.err, tc.attempts, tc.waited, options, () => tc.random ?? 0), tc.want);
    });
  }
  test("defaults", () => {
    assert.deepEqual(defaults, { maxAttempts: 3, maxDelayMs: 10_000, maxTotalDelayMs: 20_000, jitter: 0.2 });
  });
});

describe("describeLimit", () => {
  const cases: { name: string; err: unknown; want: ReturnType<typeof describeLimit> }[] = [
    {
      name: "a denial a wait cures",
      err: denial({ retryMs: 741.2, bucket: "search", retryAfter: "1" }),
      want: { bucket: "search", subject: "key:alice-demo", retryAfterMs: 742, message: 'connectlimit: rate limit exceeded for bucket "search"' },
    },
    {
      name: "over capacity: no wait helps",
      err: denial({ bucket: "generate_tokens" }),
      want: { bucket: "generate_tokens", subject: "key:alice-demo", retryAfterMs: undefined, message: 'connectlimit: rate limit exceeded for bucket "generate_tokens"' },
    },
    {
      name: "Retry-After when RetryInfo is missing",
      err: denial({ bucket: "search", retryAfter: "3" }),
      want: { bucket: "search", subject: "key:alice-demo", retryAfterMs: 3000, message: 'connectlimit: rate limit exceeded for bucket "search"' },
    },
    {
      name: "a malformed Retry-After is ignored",
      err: denial({ bucket: "search", retryAfter: "Wed, 21 Oct 2015 07:28:00 GMT" }),
      want: { bucket: "search", subject: "key:alice-demo", retryAfterMs: undefined, message: 'connectlimit: rate limit exceeded for bucket "search"' },
    },
    {
      name: "RetryInfo without QuotaFailure",
      err: denial({ retryMs: 2000 }),
      want: { bucket: undefined, subject: undefined, retryAfterMs: 2000, message: 'connectlimit: rate limit exceeded for bucket "?"' },
    },
    { name: "resource_exhausted without details is not a denial", err: denial({}), want: undefined },
    { name: "another code", err: denial({ retryMs: 5, bucket: "search", code: Code.PermissionDenied }), want: undefined },
    { name: "not a ConnectError", err: new Error("x"), want: undefined },
    { name: "undefined", err: undefined, want: undefined },
  ];
  for (const tc of cases) {
    test(tc.name, () => assert.deepEqual(describeLimit(tc.err), tc.want));
  }
});
