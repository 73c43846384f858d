// Integration tests against the real Go example server (examples/aiservice),
// built once and run with small configurations, through connect-web's
// transport (fetch, as in a browser) and, for gRPC trailers, connect-node's.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-web";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { AIService } from "../src/gen/aiservice/v1/aiservice_pb.js";
import { QuotaService } from "../src/gen/connectlimit/v1/quota_pb.js";
import {
  createQuotaState,
  createRateLimitInterceptor,
  describeLimit,
  type QuotaState,
  type RateLimitInterceptorOptions,
  type RetryEvent,
} from "../src/index.js";
import { retryInfoDelayMs } from "../src/retry.js";
import { Servers, type Server } from "./aiservice.js";

// Every test calls with its own API key, so each has its own buckets.
const keys = ["state", "deny", "retry", "over", "stream", "pace", "pace-control", "abort", "cut", "cut-grpc", "conc"];
const apiKeys = keys.map((k) => `  key-${k}: { user: ${k}, name: ${k}, tier: ${tierOf(k)} }`).join("\n");

function tierOf(key: string): string {
  switch (key) {
    case "retry":
      return "fast";
    case "pace":
    case "pace-control":
      return "paced";
    case "over":
      return "small";
    case "conc":
      return "roomy";
    default:
      return "free";
  }
}

// Main: a slow search bucket (3, then one every 20 s) by default, a fast one
// for the retry test (1, then one every 2 s) and a paced one (4, 4 a second).
const mainConfig = `
buckets:
  search:            { capacity: 3,       refill_per_second: 0.05 }
  generate_requests: { capacity: 100,     period: 1h }
  generate_tokens:   { capacity: 100000,  period: 1h }
  all_ai_tokens:     { capacity: 1000000, period: 24h }
concurrency:
  generate_streams: { limit: 1 }
tiers:
  free: {}
  fast:  { buckets: { search: { capacity: 1, refill_per_second: 0.5 } } }
  paced: { buckets: { search: { capacity: 4, refill_per_second: 4 } } }
  small: { buckets: { generate_tokens: { capacity: 100, period: 1h } } }
  roomy: {}
default_tier: free
api_keys:
${apiKeys}
`;

// Cut: GenerateReport reserves 1 token and takes the rest as it streams, from
// a 40-token bucket, so a report of 200 tokens is cut off mid-way. Chunks
// come every 20 ms, so that a stream stays open for the concurrency test.
const cutConfig = `
buckets:
  search:            { capacity: 3,       refill_per_second: 0.05 }
  generate_requests: { capacity: 100,     period: 1h }
  generate_tokens:   { capacity: 40,      period: 1h }
  all_ai_tokens:     { capacity: 1000000, period: 24h }
concurrency:
  generate_streams: { limit: 1 }
procedures:
  /aiservice.v1.AIService/GenerateReport:
    charges:
      - { bucket: generate_requests, cost: 1 }
      - bucket: generate_tokens
        estimate: "1"
        actual: "response.tokens + (has(response.usage) ? response.usage.prompt_tokens : 0)"
    concurrency: generate_streams
tiers:
  free: {}
  fast: {}
  paced: {}
  small: {}
  roomy: { buckets: { generate_tokens: { capacity: 100000, period: 1h } } }
default_tier: free
api_keys:
${apiKeys}
`;

/** Calls counts the HTTP requests a transport sends, by procedure and status. */
class Calls {
  readonly log: { procedure: string; status: number }[] = [];
  readonly fetch: typeof globalThis.fetch = async (input, init) => {
    const res = await globalThis.fetch(input, init);
    const url = typeof input === "string" ? input : input instanceof URL ? input.href : input.url;
    this.log.push({ procedure: new URL(url).pathname, status: res.status });
    return res;
  };
  count(procedure: string): number {
    return this.log.filter((c) => c.procedure.endsWith(procedure)).length;
  }
  status(status: number): number {
    return this.log.filter((c) => c.status === status).length;
  }
}

function bearer(key: string): Interceptor {
  return (next) => (req) => {
    req.header.set("Authorization", `Bearer key-${key}`);
    return next(req);
  };
}

/** web returns clients over connect-web's Connect transport, as a browser has. */
function web(server: Server, key: string, options: RateLimitInterceptorOptions) {
  const calls = new Calls();
  const transport = createConnectTransport({
    baseUrl: server.url,
    fetch: calls.fetch,
    // The rate-limit interceptor first (outermost), so that it sees each
    // attempt's answer and its retries go through the inner ones again.
    interceptors: [createRateLimitInterceptor(options), bearer(key)],
  });
  return { ai: createClient(AIService, transport), quota: createClient(QuotaService, transport), calls };
}

async function rejection(p: Promise<unknown>): Promise<ConnectError> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof ConnectError, `not a ConnectError: ${String(e)}`);
    return e;
  }
  assert.fail("the call succeeded");
}

async function drain(stream: AsyncIterable<{ text: string }>, texts: string[] = []): Promise<string[]> {
  for await (const m of stream) {
    texts.push(m.text);
  }
  return texts;
}

describe("against the Go example server", { timeout: 600_000 }, () => {
  const servers = new Servers();
  let main: Server;
  let cut: Server;

  before(async () => {
    await servers.build();
    [main, cut] = await Promise.all([servers.start("main", mainConfig), servers.start("cut", cutConfig, "20ms")]);
  }, { timeout: 360_000 });

  after(() => servers.close());

  test("a search updates the quota state, and GetQuota agrees", { timeout: 60_000 }, async () => {
    const state = createQuotaState();
    const changes: (readonly string[])[] = [];
    state.subscribe((names) => changes.push(names));
    const { ai, quota } = web(main, "state", { state });
    const before = Date.now();
    await ai.search({ query: "token bucket" });
    assert.deepEqual(changes, [["search", "all_ai_tokens"]]);
    const search = state.get("search");
    assert.ok(search !== undefined);
    assert.equal(search.remaining, 2);
    assert.equal(search.limit, 3);
    assert.equal(search.windowSeconds, 60);
    assert.equal(search.refillPerSecond, 0.05);
    assert.ok(search.resetAt !== undefined && search.resetAt >= before + 20_000 && search.resetAt <= Date.now() + 20_000);
    assert.equal(state.get("all_ai_tokens")?.remaining, 999_999);

    state.applyQuota(await quota.getQuota({}));
    assert.ok(Math.abs((state.get("search")?.remaining ?? 0) - 2) < 0.5, "GetQuota sees the same bucket");
    assert.deepEqual(
      state.all().map((b) => b.bucket),
      ["all_ai_tokens", "generate_requests", "generate_tokens", "search"],
    );
  });

  test("a search past the limit is a denial that describeLimit describes", { timeout: 60_000 }, async () => {
    const state = createQuotaState();
    const { ai, calls } = web(main, "deny", { state, retry: false });
    for (let i = 0; i < 3; i++) {
      await ai.search({ query: "q" });
    }
    const err = await rejection(ai.search({ query: "q" }));
    assert.equal(err.code, Code.ResourceExhausted);
    assert.equal(calls.status(429), 1);
    const info = retryInfoDelayMs(err);
    assert.ok(info !== undefined && info > 10_000 && info <= 20_000, `RetryInfo ${info} ms`);
    const d = describeLimit(err);
    assert.deepEqual(d, {
      bucket: "search",
      subject: "key:deny",
      retryAfterMs: info,
      message: d?.message,
    });
    assert.match(d?.message ?? "", /^connectlimit: rate limit exceeded for bucket "search": retry in /);
    assert.equal(err.metadata.get("Retry-After"), String(Math.ceil(info / 1000)));
    assert.equal(state.get("search")?.remaining, 0, "the denial's headers are recorded");
  });

  test("a denial with RetryInfo is retried after its delay and succeeds", { timeout: 60_000 }, async () => {
    const state = createQuotaState();
    const retries: RetryEvent[] = [];
    const { ai, calls } = web(main, "retry", { state, onRetry: (e) => retries.push(e) });
    await ai.search({ query: "token bucket" }); // takes the only token
    const started = Date.now();
    const res = await ai.search({ query: "token bucket" }); // a token comes back in 2 s
    assert.ok(res.results.length > 0);
    assert.ok(retries.length >= 1, "retried");
    const first = retries[0]!;
    assert.equal(first.procedure, "/aiservice.v1.AIService/Search");
    assert.ok(first.delayMs >= (retryInfoDelayMs(first.error) ?? Infinity), "waited at least the RetryInfo delay");
    assert.ok(Date.now() - started >= first.delayMs);
    assert.equal(calls.status(429), retries.length);
    assert.equal(calls.count("/Search"), 2 + retries.length);
    assert.equal(state.get("search")?.remaining, 0);
  });

  test("a report that costs more than its bucket holds is not retried", { timeout: 60_000 }, async () => {
    const retries: RetryEvent[] = [];
    const { ai, calls } = web(main, "over", { onRetry: (e) => retries.push(e) });
    // The estimate, prompt + max_tokens, is over the 100-token bucket.
    const err = await rejection(drain(ai.generateReport({ topic: "token buckets", maxTokens: 500 })));
    assert.equal(err.code, Code.ResourceExhausted);
    assert.equal(retryInfoDelayMs(err), undefined);
    assert.deepEqual(retries, []);
    assert.equal(calls.count("/GenerateReport"), 1);
    const d = describeLimit(err);
    assert.equal(d?.bucket, "generate_tokens");
    assert.equal(d?.retryAfterMs, undefined);
    assert.match(d?.message ?? "", /can never be allowed/);
  });

  test("a concurrency limit is not retried", { timeout: 60_000 }, async () => {
    const retries: RetryEvent[] = [];
    const { ai, calls } = web(cut, "conc", { onRetry: (e) => retries.push(e) });
    const abort = new AbortController();
    const first = ai.generateReport({ topic: "token buckets", maxTokens: 2000 }, { signal: abort.signal })[Symbol.asyncIterator]();
    try {
      assert.equal((await first.next()).done, false, "the first stream runs");
      const err = await rejection(drain(ai.generateReport({ topic: "token buckets", maxTokens: 10 })));
      assert.equal(err.code, Code.ResourceExhausted);
      assert.deepEqual(retries, []);
      assert.equal(calls.count("/GenerateReport"), 2);
      const d = describeLimit(err);
      assert.equal(d?.bucket, "generate_streams");
      assert.equal(d?.retryAfterMs, undefined);
    } finally {
      abort.abort();
      await first.return?.().catch(() => {});
    }
  });

  test("a report stream's headers update the state", { timeout: 60_000 }, async () => {
    const state = createQuotaState();
    const { ai } = web(main, "stream", { state });
    let atFirstMessage: number | undefined;
    let usage = 0;
    for await (const m of ai.generateReport({ topic: "token buckets", maxTokens: 50 })) {
      atFirstMessage ??= state.get("generate_requests")?.remaining;
      usage = m.usage?.totalTokens ?? usage;
    }
    assert.equal(atFirstMessage, 99, "headers were recorded before the first message");
    assert.ok(usage > 0);
    // The headers show the reservation: the prompt and max_tokens.
    const reserved = 100_000 - (state.get("generate_tokens")?.remaining ?? 0);
    assert.ok(reserved >= 50 && reserved < 100, `reserved ${reserved}`);
    assert.ok(state.get("all_ai_tokens") !== undefined);
  });

  for (const protocol of ["connect", "grpc"] as const) {
    test(`a stream cut mid-way updates the state from its trailers (${protocol})`, { timeout: 60_000 }, async () => {
      const state = createQuotaState();
      const retries: RetryEvent[] = [];
      // Long enough bounds that only "a message was delivered" stops a retry.
      const options: RateLimitInterceptorOptions = {
        state,
        retry: { maxDelayMs: 3_600_000, maxTotalDelayMs: 3_600_000 },
        onRetry: (e) => retries.push(e),
      };
      const key = protocol === "connect" ? "cut" : "cut-grpc";
      let ai;
      let calls: Calls | undefined;
      if (protocol === "connect") {
        ({ ai, calls } = web(cut, key, options));
      } else {
        ai = createClient(
          AIService,
          createGrpcTransport({ baseUrl: cut.url, interceptors: [createRateLimitInterceptor(options), bearer(key)] }),
        );
      }
      const texts: string[] = [];
      let headerTokens: number | undefined;
      const err = await rejection(
        (async () => {
          for await (const m of ai.generateReport({ topic: "token buckets", maxTokens: 200 })) {
            headerTokens ??= state.get("generate_tokens")?.remaining;
            texts.push(m.text);
          }
        })(),
      );
      assert.equal(err.code, Code.ResourceExhausted);
      assert.ok(texts.length > 0 && texts.length < 20, `${texts.length} messages before the cut`);
      assert.equal(headerTokens, 39, "the headers show the reservation of 1");
      assert.equal(state.get("generate_tokens")?.remaining, 0, "the trailers show the bucket spent");
      assert.ok((state.get("generate_tokens")?.resetAt ?? 0) > Date.now() + 3_000_000);
      assert.deepEqual(retries, [], "a stream that delivered a message is not retried");
      if (calls !== undefined) {
        assert.equal(calls.count("/GenerateReport"), 1);
      }
      const d = describeLimit(err);
      assert.equal(d?.bucket, "generate_tokens");
      assert.ok(d?.retryAfterMs !== undefined && d.retryAfterMs > 60_000, `retry after ${d?.retryAfterMs}`);
    });
  }

  test("pacing holds calls until they can pay: no denial reaches the server", { timeout: 120_000 }, async () => {
    const burst = async (client: ReturnType<typeof web>["ai"], n: number) =>
      Promise.allSettled(Array.from({ length: n }, (_, i) => client.search({ query: `q${i}` })));

    // Without pacing, a burst of 12 on a bucket of 4 is mostly denied.
    const control = web(main, "pace-control", { retry: false });
    await burst(control.ai, 12);
    assert.ok(control.calls.status(429) >= 1, "the burst is over the limit");

    const state: QuotaState = createQuotaState();
    let holds = 0;
    const paced = web(main, "pace", { state, retry: false, pacing: true, onHold: () => holds++ });
    await paced.ai.search({ query: "learn the bucket" });
    const started = Date.now();
    const results = await burst(paced.ai, 12);
    assert.deepEqual(
      results.filter((r) => r.status === "rejected").map((r) => String((r as PromiseRejectedResult).reason)),
      [],
    );
    assert.equal(paced.calls.status(429), 0, "no call was denied");
    assert.equal(paced.calls.count("/Search"), 13);
    assert.ok(holds > 0, "some calls were held");
    // 3 tokens left and 4 a second: the last of 12 can go after 9/4 s.
    assert.ok(Date.now() - started >= 2000, `took ${Date.now() - started} ms`);
  });

  test("aborting a call during its retry wait cancels it", { timeout: 60_000 }, async () => {
    const retries: RetryEvent[] = [];
    const { ai, calls } = web(main, "abort", {
      retry: { maxDelayMs: 60_000, maxTotalDelayMs: 60_000 },
      onRetry: (e) => retries.push(e),
    });
    for (let i = 0; i < 3; i++) {
      await ai.search({ query: "q" });
    }
    const abort = new AbortController();
    const started = Date.now();
    const pending = ai.search({ query: "q" }, { signal: abort.signal });
    while (retries.length === 0 && Date.now() - started < 30_000) {
      await new Promise((r) => setTimeout(r, 10));
    }
    assert.equal(retries.length, 1, "waiting for a retry");
    assert.ok(retries[0]!.delayMs > 10_000);
    const abortedAt = Date.now();
    abort.abort();
    const err = await rejection(pending);
    assert.equal(err.code, Code.Canceled);
    assert.ok(Date.now() - abortedAt < 5_000, "rejected promptly");
    assert.equal(calls.count("/Search"), 4, "no attempt after the abort");
  });
});
