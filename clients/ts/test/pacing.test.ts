import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { AIService } from "../src/gen/aiservice/v1/aiservice_pb.js";
import { QuotaService } from "../src/gen/connectlimit/v1/quota_pb.js";
import { annotatedCharges, delayMs, estimateRemaining, mergeCharges } from "../src/pacing.js";
import type { BucketState } from "../src/state.js";

const t0 = Date.UTC(2026, 0, 1);

// search: 60 tokens, 1 a second, observed at t0.
function search(remaining: number, resetSeconds: number): BucketState {
  return {
    bucket: "search",
    remaining,
    limit: 60,
    windowSeconds: 60,
    refillPerSecond: 1,
    resetAt: t0 + resetSeconds * 1000,
    updatedAt: t0,
  };
}

describe("estimateRemaining", () => {
  const cases: { name: string; state: BucketState; at: number; want: number }[] = [
    { name: "at the observation", state: search(10, 50), at: t0, want: 10 },
    { name: "refills at the rate", state: search(10, 50), at: t0 + 2500, want: 12.5 },
    { name: "never above the limit", state: search(59, 1), at: t0 + 900, want: 59.9 },
    { name: "full once reset", state: search(59, 1), at: t0 + 1000, want: 60 },
    { name: "a clock before the observation adds nothing", state: search(10, 50), at: t0 - 5000, want: 10 },
    { name: "r=0 with t=60 is empty", state: search(0, 60), at: t0, want: 0 },
    { name: "r=0 with t=90 is 30 in debt", state: search(0, 90), at: t0, want: -30 },
    { name: "debt refills too", state: search(0, 90), at: t0 + 40_000, want: 10 },
    {
      name: "no refill rate: the last value until reset",
      state: { bucket: "x", remaining: 3, limit: 10, windowSeconds: undefined, refillPerSecond: undefined, resetAt: t0 + 5000, updatedAt: t0 },
      at: t0 + 4000,
      want: 3,
    },
    {
      name: "no limit: refill without a cap",
      state: { bucket: "x", remaining: 3, limit: undefined, windowSeconds: undefined, refillPerSecond: 2, resetAt: undefined, updatedAt: t0 },
      at: t0 + 10_000,
      want: 23,
    },
  ];
  for (const tc of cases) {
    test(tc.name, () => {
      assert.ok(Math.abs(estimateRemaining(tc.state, tc.at) - tc.want) < 1e-9, `got ${estimateRemaining(tc.state, tc.at)}`);
    });
  }
});

describe("delayMs", () => {
  // Steps at fixed instants, as a paced caller sees them.
  const cases: { name: string; state: BucketState | undefined; cost: number; pending: number; at: number; want: number }[] = [
    { name: "unknown bucket: send", state: undefined, cost: 1, pending: 0, at: t0, want: 0 },
    { name: "enough tokens: send", state: search(5, 55), cost: 5, pending: 0, at: t0, want: 0 },
    { name: "one short: a second", state: search(4, 56), cost: 5, pending: 0, at: t0, want: 1000 },
    { name: "one short, half a second later", state: search(4, 56), cost: 5, pending: 0, at: t0 + 500, want: 500 },
    { name: "one short, a second later: send", state: search(4, 56), cost: 5, pending: 0, at: t0 + 1000, want: 0 },
    { name: "empty", state: search(0, 60), cost: 1, pending: 0, at: t0, want: 1000 },
    { name: "in debt: the debt first", state: search(0, 90), cost: 1, pending: 0, at: t0, want: 31_000 },
    { name: "pending calls count", state: search(5, 55), cost: 1, pending: 5, at: t0, want: 1000 },
    { name: "pending calls fill the bucket: wait for answers", state: search(60, 0), cost: 10, pending: 55, at: t0, want: Infinity },
    { name: "cost over capacity: send, the server says why", state: search(60, 0), cost: 61, pending: 0, at: t0, want: 0 },
    { name: "the cost at capacity waits for reset", state: search(30, 30), cost: 60, pending: 0, at: t0, want: 30_000 },
    {
      name: "w rounded up: the reset bounds the wait",
      // 100 tokens at 3/s: w=34, so the rate estimate is 100/34 = 2.94/s
      state: { bucket: "x", remaining: 97, limit: 100, windowSeconds: 34, refillPerSecond: 100 / 34, resetAt: t0 + 1000, updatedAt: t0 },
      cost: 100,
      pending: 0,
      at: t0,
      want: 1000,
    },
    {
      name: "no rate and no reset: send",
      state: { bucket: "x", remaining: 0, limit: undefined, windowSeconds: undefined, refillPerSecond: undefined, resetAt: undefined, updatedAt: t0 },
      cost: 1,
      pending: 0,
      at: t0,
      want: 0,
    },
    {
      name: "no rate: until reset",
      state: { bucket: "x", remaining: 0, limit: 10, windowSeconds: undefined, refillPerSecond: undefined, resetAt: t0 + 7000, updatedAt: t0 },
      cost: 1,
      pending: 0,
      at: t0 + 2000,
      want: 5000,
    },
  ];
  for (const tc of cases) {
    test(tc.name, () => {
      assert.equal(delayMs(tc.state, tc.cost, tc.pending, tc.at), tc.want);
    });
  }
});

test("annotatedCharges reads fixed costs from (connectlimit.v1.limit)", () => {
  assert.deepEqual(annotatedCharges(AIService.method.search), [
    { bucket: "search", cost: 1 },
    { bucket: "all_ai_tokens", cost: 1 },
  ]);
  // The token charges are estimated from the request: only the server knows.
  assert.deepEqual(annotatedCharges(AIService.method.generateReport), [{ bucket: "generate_requests", cost: 1 }]);
  assert.deepEqual(annotatedCharges(QuotaService.method.getQuota), []);
  assert.equal(annotatedCharges(AIService.method.search), annotatedCharges(AIService.method.search), "cached");
});

test("mergeCharges adds per-call charges, replacing a bucket, dropping bad costs", () => {
  assert.deepEqual(
    mergeCharges(
      [
        { bucket: "generate_requests", cost: 1 },
        { bucket: "all_ai_tokens", cost: 1 },
      ],
      [
        { bucket: "all_ai_tokens", cost: 250 },
        { bucket: "generate_tokens", cost: 250 },
        { bucket: "zero", cost: 0 },
        { bucket: "nan", cost: NaN },
        { bucket: "", cost: 1 },
      ],
    ),
    [
      { bucket: "generate_requests", cost: 1 },
      { bucket: "all_ai_tokens", cost: 250 },
      { bucket: "generate_tokens", cost: 250 },
    ],
  );
});
