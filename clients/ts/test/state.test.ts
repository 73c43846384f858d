import assert from "node:assert/strict";
import { test } from "node:test";
import { create } from "@bufbuild/protobuf";
import { GetQuotaResponseSchema } from "../src/gen/connectlimit/v1/quota_pb.js";
import { createQuotaState } from "../src/index.js";

const t0 = Date.UTC(2026, 0, 1);

function headers(fields: Record<string, string>): Headers {
  return new Headers(fields);
}

test("applyHeaders records each bucket of a response", () => {
  const state = createQuotaState();
  state.applyHeaders(
    headers({
      RateLimit: '"search";r=59;t=1, "all_ai_tokens";r=99;t=1',
      "RateLimit-Policy": '"search";q=60;w=60, "all_ai_tokens";q=100;w=86400',
    }),
    t0,
  );
  assert.deepEqual(state.get("search"), {
    bucket: "search",
    remaining: 59,
    limit: 60,
    windowSeconds: 60,
    refillPerSecond: 1,
    resetAt: t0 + 1000,
    updatedAt: t0,
  });
  assert.equal(state.get("all_ai_tokens")?.refillPerSecond, 100 / 86400);
  assert.deepEqual(
    state.all().map((b) => b.bucket),
    ["all_ai_tokens", "search"],
  );
  assert.ok(Object.isFrozen(state.get("search")));
  assert.equal(state.get("nope"), undefined);
});

test("a response without a policy keeps the known limit", () => {
  const state = createQuotaState();
  state.applyHeaders(headers({ RateLimit: '"search";r=5;t=3', "RateLimit-Policy": '"search";q=10;w=5' }), t0);
  state.applyHeaders(headers({ RateLimit: '"search";r=4' }), t0 + 10);
  assert.deepEqual(state.get("search"), {
    bucket: "search",
    remaining: 4,
    limit: 10,
    windowSeconds: 5,
    refillPerSecond: 2,
    resetAt: undefined,
    updatedAt: t0 + 10,
  });
});

test("a late answer does not raise a bucket a call sent after it lowered", () => {
  const policy = '"search";q=4;w=1';
  for (const tc of [
    // Answers of two calls sent at t0, the second decided first: the
    // first's r=2 arrives after the second's r=1 and is older.
    { name: "out of order", first: 1, late: 2, sentAt: t0, want: 1 },
    // The late answer is lower: it is the newer one, and counts.
    { name: "in order", first: 2, late: 1, sentAt: t0, want: 1 },
    // The other answer was observed before this call was sent: the
    // headers are newer whatever they say.
    { name: "sent after", first: 1, late: 3, sentAt: t0 + 20, want: 3 },
    // Without sentAt, the headers replace the state.
    { name: "no sentAt", first: 1, late: 2, sentAt: undefined, want: 2 },
  ]) {
    const state = createQuotaState();
    state.applyHeaders(headers({ RateLimit: `"search";r=${tc.first};t=1`, "RateLimit-Policy": policy }), t0 + 10);
    state.applyHeaders(headers({ RateLimit: `"search";r=${tc.late};t=1`, "RateLimit-Policy": policy }), t0 + 30, tc.sentAt);
    const got = state.get("search");
    assert.equal(got?.remaining, tc.want, tc.name);
    assert.equal(got?.updatedAt, tc.want === tc.first ? t0 + 10 : t0 + 30, tc.name);
  }
});

test("warnings are set by Connectlimit-Warning and cleared by the next RateLimit", () => {
  const state = createQuotaState();
  state.applyHeaders(
    headers({
      RateLimit: '"generate_tokens";r=800;t=3300, "generate_requests";r=19;t=180',
      "RateLimit-Policy": '"generate_tokens";q=10000;w=3600, "generate_requests";q=20;w=3600',
      "Connectlimit-Warning": '"generate_tokens";r=800;q=10000',
    }),
    t0,
  );
  assert.deepEqual(state.get("generate_tokens")?.warning, { remaining: 800, limit: 10000 });
  assert.equal(state.get("generate_requests")?.warning, undefined);
  assert.equal("warning" in (state.get("generate_requests") ?? {}), false);
  state.applyHeaders(headers({ RateLimit: '"generate_tokens";r=5000;t=1800' }), t0 + 1);
  assert.equal(state.get("generate_tokens")?.warning, undefined);
});

test("malformed fields change nothing", () => {
  const state = createQuotaState();
  let calls = 0;
  state.subscribe(() => calls++);
  state.applyHeaders(headers({ RateLimit: '"search";r=59;t=1,', "RateLimit-Policy": '"search";q=60;w=60' }), t0);
  state.applyHeaders(headers({ RateLimit: "search=59" }), t0);
  state.applyHeaders(headers({}), t0);
  assert.equal(calls, 0);
  assert.deepEqual(state.all(), []);
});

test("subscribe notifies with the changed buckets until unsubscribed", () => {
  const state = createQuotaState();
  const seen: (readonly string[])[] = [];
  const listener = (names: readonly string[]) => seen.push(names);
  const unsubscribe = state.subscribe(listener);
  state.subscribe(listener); // once only
  state.applyHeaders(headers({ RateLimit: '"b";r=1, "a";r=2' }), t0);
  const before = state.all();
  assert.equal(state.all(), before, "all() is stable while nothing changes");
  state.applyHeaders(headers({ RateLimit: '"a";r=1' }), t0 + 1);
  assert.notEqual(state.all(), before);
  assert.equal(state.all()[1], before[1], "an unchanged bucket keeps its object");
  unsubscribe();
  state.applyHeaders(headers({ RateLimit: '"a";r=0' }), t0 + 2);
  assert.deepEqual(seen, [["b", "a"], ["a"]]);
  state.subscribe(listener);
  state.clear();
  assert.deepEqual(seen.at(-1), ["b", "a"]);
  assert.deepEqual(state.all(), []);
});

test("a listener that throws does not stop the others", () => {
  const state = createQuotaState();
  const queued: (() => void)[] = [];
  const original = globalThis.queueMicrotask;
  globalThis.queueMicrotask = (fn) => queued.push(fn);
  let second = 0;
  try {
    state.subscribe(() => {
      throw new Error("listener bug");
    });
    state.subscribe(() => second++);
    state.applyHeaders(headers({ RateLimit: '"a";r=1' }), t0);
  } finally {
    globalThis.queueMicrotask = original;
  }
  assert.equal(second, 1);
  assert.equal(queued.length, 1);
  assert.throws(() => queued[0]?.(), /listener bug/);
});

test("applyQuota seeds exact values, which later headers keep while they agree", () => {
  const state = createQuotaState();
  state.applyQuota(
    create(GetQuotaResponseSchema, {
      subject: "key:alice-demo",
      tier: "free",
      buckets: [
        { name: "search", capacity: 100, refillPerSecond: 3, remaining: -2.5, resetAfter: { seconds: 34n, nanos: 166_000_000 } },
        { name: "daily", capacity: 1000, refillPerSecond: 0.5, remaining: 1000 },
      ],
    }),
    t0,
  );
  assert.deepEqual(state.get("search"), {
    bucket: "search",
    remaining: -2.5,
    limit: 100,
    windowSeconds: 34,
    refillPerSecond: 3,
    resetAt: t0 + 34_166,
    updatedAt: t0,
  });
  assert.equal(state.get("daily")?.resetAt, undefined);
  // The policy rounds w up (100/3 s → 34): the exact rate stays.
  state.applyHeaders(headers({ RateLimit: '"search";r=0;t=30', "RateLimit-Policy": '"search";q=100;w=34' }), t0 + 5000);
  assert.equal(state.get("search")?.refillPerSecond, 3);
  // A new policy (another tier, say) replaces it with the estimate.
  state.applyHeaders(headers({ RateLimit: '"search";r=10;t=30', "RateLimit-Policy": '"search";q=1000;w=100' }), t0 + 6000);
  assert.equal(state.get("search")?.refillPerSecond, 10);
});
