// Unit tests of the interceptor against an in-memory connect-es server that
// answers as scripted, with a virtual clock: no network, no real waits
// (except where a test says so).
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import {
  Code,
  ConnectError,
  createClient,
  createContextValues,
  createRouterTransport,
  type HandlerContext,
} from "@connectrpc/connect";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { AIService, type GenerateReportResponseSchema } from "../src/gen/aiservice/v1/aiservice_pb.js";
import { RetryInfoSchema, QuotaFailureSchema } from "../src/gen/google/rpc/error_details_pb.js";
import { chargesKey, createQuotaState, type QuotaState, type RateLimitInterceptorOptions, type RetryEvent } from "../src/index.js";
import { newRateLimitInterceptor, withoutSuffix, type Clock } from "../src/interceptor.js";

const t0 = Date.UTC(2026, 0, 1);

/** virtualClock advances its time by each sleep, at once. */
function virtualClock(random = 0): Clock & { sleeps: number[] } {
  let now = t0;
  const sleeps: number[] = [];
  return {
    sleeps,
    now: () => now,
    random: () => random,
    async sleep(ms, signal) {
      if (signal.aborted) {
        throw signal.reason;
      }
      sleeps.push(ms);
      now += ms;
      await Promise.resolve();
    },
  };
}

type Outcome = "ok" | { retryMs?: number; bucket: string };

function denialError(o: Exclude<Outcome, "ok">, metadata: HeadersInit): ConnectError {
  const details: ConstructorParameters<typeof ConnectError>[3] = [
    { desc: QuotaFailureSchema, value: { violations: [{ subject: "key:test", quotaId: o.bucket }] } },
  ];
  if (o.retryMs !== undefined) {
    details.push({ desc: RetryInfoSchema, value: { retryDelay: { seconds: BigInt(Math.floor(o.retryMs / 1000)), nanos: (o.retryMs % 1000) * 1e6 } } });
  }
  return new ConnectError(`connectlimit: rate limit exceeded for bucket "${o.bucket}"`, Code.ResourceExhausted, metadata, details);
}

/**
 * scripted returns a client of an in-memory AIService whose Search answers
 * the next outcome of searches (the last one repeats), with RateLimit fields
 * saying how many attempts remain, and whose GenerateReport runs reports().
 */
function scripted(
  options: RateLimitInterceptorOptions,
  clock: Clock,
  searches: Outcome[],
  reports?: (ctx: HandlerContext, attempt: number) => AsyncIterable<MessageInitShape<typeof GenerateReportResponseSchema>>,
) {
  let searchCalls = 0;
  let reportCalls = 0;
  const transport = createRouterTransport(
    (router) =>
      router.service(AIService, {
        search(_req, ctx) {
          const outcome = searches[Math.min(searchCalls, searches.length - 1)] ?? "ok";
          searchCalls++;
          const fields = { RateLimit: `"search";r=${outcome === "ok" ? 10 : 0};t=5`, "RateLimit-Policy": '"search";q=10;w=10' };
          if (outcome !== "ok") {
            throw denialError(outcome, fields);
          }
          for (const [k, v] of Object.entries(fields)) {
            ctx.responseHeader.set(k, v);
          }
          return { results: [{ title: "ok" }] };
        },
        async *generateReport(_req, ctx) {
          reportCalls++;
          if (reports === undefined) {
            throw new ConnectError("unimplemented", Code.Unimplemented);
          }
          for await (const m of reports(ctx, reportCalls)) {
            yield m;
          }
        },
      }),
    { transport: { interceptors: [newRateLimitInterceptor(options, clock)] } },
  );
  return {
    client: createClient(AIService, transport),
    searchCalls: () => searchCalls,
    reportCalls: () => reportCalls,
  };
}

describe("retries", () => {
  test("a denial with RetryInfo is retried after its delay plus jitter", async () => {
    const clock = virtualClock(0.5);
    const state = createQuotaState();
    const events: RetryEvent[] = [];
    const { client, searchCalls } = scripted(
      { state, onRetry: (e) => events.push(e) },
      clock,
      [{ retryMs: 300, bucket: "search" }, { retryMs: 200, bucket: "search" }, "ok"],
    );
    const res = await client.search({ query: "q" });
    assert.equal(res.results[0]?.title, "ok");
    assert.equal(searchCalls(), 3);
    assert.deepEqual(clock.sleeps, [330, 220]);
    assert.deepEqual(
      events.map((e) => [e.procedure, e.attempt, e.delayMs, e.error.code]),
      [
        ["/aiservice.v1.AIService/Search", 1, 330, Code.ResourceExhausted],
        ["/aiservice.v1.AIService/Search", 2, 220, Code.ResourceExhausted],
      ],
    );
    assert.equal(state.get("search")?.remaining, 10);
  });

  test("attempts are bounded", async () => {
    const clock = virtualClock();
    const state = createQuotaState();
    const { client, searchCalls } = scripted({ state }, clock, [{ retryMs: 100, bucket: "search" }]);
    await assert.rejects(client.search({ query: "q" }), (e: unknown) => e instanceof ConnectError && e.code === Code.ResourceExhausted);
    assert.equal(searchCalls(), 3);
    assert.deepEqual(clock.sleeps, [100, 100]);
    assert.equal(state.get("search")?.remaining, 0, "the denial's headers are recorded");
  });

  test("the total wait is bounded", async () => {
    const clock = virtualClock();
    const { client, searchCalls } = scripted({ retry: { maxAttempts: 10, maxTotalDelayMs: 1000 } }, clock, [
      { retryMs: 400, bucket: "search" },
    ]);
    await assert.rejects(client.search({ query: "q" }));
    assert.equal(searchCalls(), 3);
    assert.deepEqual(clock.sleeps, [400, 400]);
  });

  test("a denial without RetryInfo is never retried", async () => {
    const clock = virtualClock();
    const { client, searchCalls } = scripted({}, clock, [{ bucket: "search" }, "ok"]);
    await assert.rejects(client.search({ query: "q" }), (e: unknown) => e instanceof ConnectError && e.code === Code.ResourceExhausted);
    assert.equal(searchCalls(), 1);
    assert.deepEqual(clock.sleeps, []);
  });

  test("retry: false turns retries off", async () => {
    const clock = virtualClock();
    const { client, searchCalls } = scripted({ retry: false }, clock, [{ retryMs: 1, bucket: "search" }, "ok"]);
    await assert.rejects(client.search({ query: "q" }));
    assert.equal(searchCalls(), 1);
  });

  test("aborting the call during a retry wait rejects at once with canceled", async () => {
    const clock = { ...virtualClock(), sleep: (ms: number, signal: AbortSignal) => systemSleep(ms, signal) };
    const { client, searchCalls } = scripted({}, clock, [{ retryMs: 5000, bucket: "search" }, "ok"]);
    const abort = new AbortController();
    const started = performance.now();
    setTimeout(() => abort.abort(), 50);
    await assert.rejects(client.search({ query: "q" }, { signal: abort.signal }), (e: unknown) => e instanceof ConnectError && e.code === Code.Canceled);
    assert.ok(performance.now() - started < 4000, "did not wait for the retry delay");
    assert.equal(searchCalls(), 1);
  });

  test("a call's timeout ends its retry wait with deadline_exceeded", async () => {
    const clock = { ...virtualClock(), sleep: (ms: number, signal: AbortSignal) => systemSleep(ms, signal) };
    const { client, searchCalls } = scripted({}, clock, [{ retryMs: 5000, bucket: "search" }, "ok"]);
    const started = performance.now();
    await assert.rejects(client.search({ query: "q" }, { timeoutMs: 100 }), (e: unknown) => e instanceof ConnectError && e.code === Code.DeadlineExceeded);
    assert.ok(performance.now() - started < 4000, "did not wait for the retry delay");
    assert.equal(searchCalls(), 1);
  });

  test("a server stream denied before its first message is retried", async () => {
    const clock = virtualClock();
    const state = createQuotaState();
    const { client, reportCalls } = scripted({ state }, clock, ["ok"], async function* (ctx, attempt) {
      ctx.responseHeader.set("RateLimit", `"generate_requests";r=${attempt === 1 ? 0 : 19};t=5`);
      if (attempt === 1) {
        throw denialError({ retryMs: 250, bucket: "generate_requests" }, {});
      }
      yield { text: "a", tokens: 1 };
      yield { text: "b", tokens: 1 };
    });
    let header: Headers | undefined;
    const texts: string[] = [];
    for await (const m of client.generateReport({ topic: "t", maxTokens: 5 }, { onHeader: (h) => (header = h) })) {
      texts.push(m.text);
    }
    assert.deepEqual(texts, ["a", "b"]);
    assert.equal(reportCalls(), 2);
    assert.deepEqual(clock.sleeps, [250]);
    assert.equal(state.get("generate_requests")?.remaining, 19);
    assert.equal(header?.get("RateLimit"), '"generate_requests";r=19;t=5', "the header of the attempt that ran");
  });

  test("a stream cut after a message is not retried, and its trailers are recorded", async () => {
    const clock = virtualClock();
    const state = createQuotaState();
    const { client, reportCalls } = scripted({ state }, clock, ["ok"], async function* (ctx) {
      ctx.responseHeader.set("RateLimit", '"generate_requests";r=99;t=36, "generate_tokens";r=39;t=90');
      ctx.responseHeader.set("RateLimit-Policy", '"generate_requests";q=100;w=3600, "generate_tokens";q=40;w=3600');
      yield { text: "a", tokens: 4 };
      throw denialError(
        { retryMs: 1, bucket: "generate_tokens" },
        { RateLimit: '"generate_tokens";r=0;t=3600', "RateLimit-Policy": '"generate_tokens";q=40;w=3600', "Retry-After": "360" },
      );
    });
    const texts: string[] = [];
    await assert.rejects(
      (async () => {
        for await (const m of client.generateReport({ topic: "t", maxTokens: 5 })) {
          texts.push(m.text);
        }
      })(),
      (e: unknown) => e instanceof ConnectError && e.code === Code.ResourceExhausted,
    );
    assert.deepEqual(texts, ["a"]);
    assert.equal(reportCalls(), 1);
    assert.deepEqual(clock.sleeps, []);
    assert.equal(state.get("generate_tokens")?.remaining, 0, "from the trailers");
    assert.equal(state.get("generate_requests")?.remaining, 99, "from the headers");
  });
});

describe("pacing", () => {
  function seeded(remaining: number, resetSeconds: number): QuotaState {
    const state = createQuotaState();
    state.applyHeaders(
      new Headers({
        RateLimit: `"search";r=${remaining};t=${resetSeconds}, "all_ai_tokens";r=1000;t=1`,
        "RateLimit-Policy": '"search";q=10;w=10, "all_ai_tokens";q=1000;w=1000',
      }),
      t0,
    );
    return state;
  }

  test("holds a call until the bucket can pay, from the annotation's cost", async () => {
    const clock = virtualClock();
    const holds: number[] = [];
    const { client, searchCalls } = scripted({ state: seeded(0, 10), pacing: true, onHold: (e) => holds.push(e.delayMs) }, clock, ["ok"]);
    await client.search({ query: "q" });
    assert.deepEqual(clock.sleeps, [1000]);
    assert.deepEqual(holds, [1000]);
    assert.equal(searchCalls(), 1);
  });

  test("pacing is off by default", async () => {
    const clock = virtualClock();
    const { client } = scripted({ state: seeded(0, 10) }, clock, ["ok"]);
    await client.search({ query: "q" });
    assert.deepEqual(clock.sleeps, []);
  });

  test("calls sent and not yet answered count", async () => {
    const clock = virtualClock();
    const state = seeded(2, 8);
    const { client } = scripted({ state, pacing: true }, clock, ["ok"]);
    // Two tokens: the two first calls go at once, the third waits for the
    // refill of one more (1 a second), although no answer has come yet.
    await Promise.all([client.search({ query: "1" }), client.search({ query: "2" }), client.search({ query: "3" })]);
    assert.deepEqual(clock.sleeps, [1000]);
  });

  test("an answer that arrives after a later one does not free tokens", async () => {
    const clock = virtualClock();
    const state = seeded(2, 8);
    const holds: number[] = [];
    // The server decides call 0 (r=1 after it), then call 1 (r=0), but
    // call 1's answer arrives first.
    const gate = () => {
      let resolve = () => {};
      const promise = new Promise<void>((r) => (resolve = r));
      return { promise, resolve };
    };
    const gates = [gate(), gate()];
    let calls = 0;
    const transport = createRouterTransport(
      (router) =>
        router.service(AIService, {
          async search(_req, ctx) {
            const n = calls++;
            ctx.responseHeader.set("RateLimit", `"search";r=${Math.max(0, 1 - n)};t=${n < 2 ? 9 + n : 10}`);
            ctx.responseHeader.set("RateLimit-Policy", '"search";q=10;w=10');
            await gates[n]?.promise;
            return { results: [] };
          },
        }),
      { transport: { interceptors: [newRateLimitInterceptor({ state, pacing: true, onHold: (e) => holds.push(e.delayMs) }, clock)] } },
    );
    const client = createClient(AIService, transport);
    const first = client.search({ query: "0" });
    const second = client.search({ query: "1" });
    await new Promise((r) => setTimeout(r, 10));
    assert.equal(calls, 2, "two tokens: both calls went");
    gates[1]!.resolve();
    await second;
    gates[0]!.resolve();
    await first;
    assert.equal(state.get("search")?.remaining, 0, "the late r=1 does not replace r=0");
    await client.search({ query: "2" });
    assert.deepEqual(holds, [1000], "the third call waits for a token");
  });

  test("per-call charges add to the procedure's", async () => {
    const clock = virtualClock();
    const { client } = scripted({ state: seeded(10, 0), pacing: true }, clock, ["ok"]);
    await client.search({ query: "q" }, { contextValues: createContextValues().set(chargesKey, [{ bucket: "all_ai_tokens", cost: 1500 }]) });
    assert.deepEqual(clock.sleeps, [], "a cost over capacity is sent at once");
    await client.search({ query: "q" }, { contextValues: createContextValues().set(chargesKey, [{ bucket: "search", cost: 10 }]) });
    assert.deepEqual(clock.sleeps, [], "r=10 pays 10");
    const state = seeded(5, 5);
    const paced = scripted({ state, pacing: true }, clock, ["ok"]);
    await paced.client.search({ query: "q" }, { contextValues: createContextValues().set(chargesKey, [{ bucket: "search", cost: 8 }]) });
    assert.deepEqual(clock.sleeps, [3000]);
  });

  test("static charges replace the annotation", async () => {
    const clock = virtualClock();
    const { client } = scripted(
      { state: seeded(1, 9), pacing: { charges: { "/aiservice.v1.AIService/Search": [{ bucket: "search", cost: 3 }] } } },
      clock,
      ["ok"],
    );
    await client.search({ query: "q" });
    assert.deepEqual(clock.sleeps, [2000]);
  });

  test("a wait longer than maxHoldMs is not held", async () => {
    const clock = virtualClock();
    const { client } = scripted({ state: seeded(0, 10), pacing: { maxHoldMs: 999 } }, clock, ["ok"]);
    await client.search({ query: "q" });
    assert.deepEqual(clock.sleeps, []);
  });

  test("a held call goes as soon as new state says it can pay", async () => {
    const state = seeded(0, 10);
    const clock = { ...virtualClock(), now: () => t0, sleep: (ms: number, signal: AbortSignal) => systemSleep(ms, signal) };
    const { client } = scripted({ state, pacing: true }, clock, ["ok"]);
    const started = performance.now();
    setTimeout(() => state.applyHeaders(new Headers({ RateLimit: '"search";r=10;t=0' }), t0), 50);
    await client.search({ query: "q" });
    assert.ok(performance.now() - started < 900, "did not sleep the whole second");
  });

  test("aborting a held call rejects with canceled", async () => {
    const state = seeded(0, 10);
    const clock = { ...virtualClock(), sleep: (ms: number, signal: AbortSignal) => systemSleep(ms, signal) };
    const { client, searchCalls } = scripted({ state, pacing: true }, clock, ["ok"]);
    await assert.rejects(
      client.search({ query: "q" }, { signal: AbortSignal.abort() }),
      (e: unknown) => e instanceof ConnectError && e.code === Code.Canceled,
    );
    assert.equal(searchCalls(), 0);
  });
});

test("withoutSuffix takes a stream's headers out of its error metadata", () => {
  const cases: [string | null, string | null, string | undefined][] = [
    [null, "h", undefined],
    ["t", null, "t"],
    ["h", "h", undefined],
    ["t, h", "h", "t"],
    ["h, t", "h", "t"],
    ['"a";r=0, "a";r=1, "b";r=2', '"a";r=1, "b";r=2', '"a";r=0'],
    ["t", "h", "t"],
  ];
  for (const [value, suffix, want] of cases) {
    assert.equal(withoutSuffix(value, suffix), want, `${value} less ${suffix}`);
  }
});

function systemSleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) {
      reject(signal.reason);
      return;
    }
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(signal.reason);
    }, { once: true });
  });
}

