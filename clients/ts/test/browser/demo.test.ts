// End-to-end tests of the browser demo (examples/aiservice/web) in a real
// Chromium driven by playwright-core, against the real Go example server:
// same-origin (the example serves the page at /) and cross-origin (a small
// static server on another loopback port serves the page, which calls the
// example through ?api= and its CORS policy).
//
// They live here rather than beside the demo so that they share this
// package's lockfile, node_modules, TypeScript settings and example-server
// helper (../aiservice.ts) with the kit's integration tests.
//
// Needs Chromium at /usr/bin/chromium (or $CHROMIUM); scripts/test.sh
// installs it. Screenshots go to examples/aiservice/web/screenshots/.
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdir, readFile } from "node:fs/promises";
import { createServer, type Server as HTTPServer } from "node:http";
import type { AddressInfo } from "node:net";
import { extname, join, resolve } from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import { fromBinary } from "@bufbuild/protobuf";
import { createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-web";
import { chromium, type Browser, type Page } from "playwright-core";
import { QuotaService, type GetQuotaResponse } from "../../src/gen/connectlimit/v1/quota_pb.js";
import { RetryInfoSchema } from "../../src/gen/google/rpc/error_details_pb.js";
import { Servers, type Server } from "../aiservice.js";

const repoRoot = resolve(fileURLToPath(new URL(".", import.meta.url)), "../../../..");
const staticDir = join(repoRoot, "examples/aiservice/web/static");
const screenshotDir = join(repoRoot, "examples/aiservice/web/screenshots");
const chromiumPath = process.env["CHROMIUM"] ?? "/usr/bin/chromium";

// Small limits so that a test is quick: one report, then one every 2.5 s;
// token budgets so large and slow to refill (1000 h) that a report's charge
// reads exactly in them.
const config = (origins: readonly string[]) => `
buckets:
  search:            { capacity: 5,      refill_per_second: 1 }
  generate_requests: { capacity: 1,      refill_per_second: 0.4 }
  generate_tokens:   { capacity: 5000,   period: 1000h }
  all_ai_tokens:     { capacity: 100000, period: 1000h }
concurrency:
  generate_streams: { limit: 1 }
api_keys:
  demo-key-alice: { user: alice, name: alice-demo }
cors:
  allowed_origins: [${origins.map((o) => JSON.stringify(o)).join(", ")}]
`;

describe("browser demo", { concurrency: true, timeout: 180_000 }, () => {
  const servers = new Servers();
  let browser: Browser;
  let pages: HTTPServer;
  let pagesOrigin: string;
  let sameOrigin: Server; // no CORS: the page comes from the example itself
  let crossOrigin: Server; // CORS for pagesOrigin

  before(async () => {
    assert.ok(
      existsSync(chromiumPath),
      `no Chromium at ${chromiumPath}: install it (Debian: apt-get install -y chromium) or set CHROMIUM; bash scripts/test.sh does this`,
    );
    const launched = chromium.launch({
      executablePath: chromiumPath,
      // playwright-core gives the browser a new temporary profile.
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
      ],
    });
    [browser, pages] = await Promise.all([launched, serveStatic(staticDir), servers.build()]);
    pagesOrigin = `http://127.0.0.1:${(pages.address() as AddressInfo).port}`;
    [sameOrigin, crossOrigin] = await Promise.all([
      servers.start("same-origin", config([]), "10ms"),
      servers.start("cross-origin", config([pagesOrigin]), "10ms"),
    ]);
    await mkdir(screenshotDir, { recursive: true });
  });

  after(async () => {
    await browser?.close();
    pages?.close();
    await servers.close();
  });

  test("same origin, anonymous: search, report, countdown, report again", async () => {
    const page = await newPage(browser);
    await page.goto(`${sameOrigin.url}/`);
    await exercise(page, {
      api: sameOrigin.url,
      key: "",
      subject: "ip:127.0.0.1",
      screenshot: join(screenshotDir, "same-origin.png"),
    });
  });

  test("cross origin, with a key chosen by keyboard: CORS exposes the limiter's headers", async () => {
    const page = await newPage(browser);
    await page.goto(`${pagesOrigin}/?api=${encodeURIComponent(crossOrigin.url)}`);
    assert.equal(await page.locator("#api-url").textContent(), crossOrigin.url);
    await page.locator("#caller[data-subject='ip:127.0.0.1']").waitFor();
    // Choose demo-key-alice, the option after Anonymous, with the keyboard.
    await page.locator("#key").focus();
    await page.keyboard.press("ArrowDown");
    assert.equal(await page.locator("#key").inputValue(), "demo-key-alice");
    await exercise(page, {
      api: crossOrigin.url,
      key: "demo-key-alice",
      subject: "key:alice-demo",
      screenshot: join(screenshotDir, "cross-origin.png"),
    });
  });

  test("cross origin to a server that allows no origin: says the API cannot be reached", async () => {
    const page = await newPage(browser, { allowConsoleErrors: true });
    await page.goto(`${pagesOrigin}/?api=${encodeURIComponent(sameOrigin.url)}`);
    const caller = page.locator("#caller");
    await caller.filter({ hasText: "cannot reach the API" }).waitFor();
    assert.match((await caller.textContent()) ?? "", /cors\.allowed_origins/);
  });
});

interface Scenario {
  /** api is the example's base URL. */
  readonly api: string;
  /** key is the API key the page calls with ("" for none). */
  readonly key: string;
  /** subject is who the server should say the caller is. */
  readonly subject: string;
  /** screenshot is where to save a screenshot of the countdown. */
  readonly screenshot: string;
}

/** exercise runs the demo's story: search, a report, a denied one, a countdown, a report again. */
async function exercise(page: Page, s: Scenario): Promise<void> {
  await page.locator(`#caller[data-subject='${s.subject}']`).waitFor();
  const bucket = (name: string) => page.locator(`#budgets li[data-bucket='${name}']`);
  await bucket("generate_tokens").waitFor();
  assert.equal(await bucket("generate_tokens").getAttribute("data-remaining"), "5000", "seeded by GetQuota");
  assert.equal(await bucket("search").getAttribute("data-remaining"), "5");

  // Search, from the keyboard. Its bar moves by the RateLimit header alone
  // (the page calls GetQuota only around reports): cross-origin, that
  // proves the header is exposed.
  await page.locator("#query").fill("token bucket");
  await page.locator("#query").press("Enter");
  await page.locator("#results li").first().waitFor();
  assert.ok((await page.locator("#results li").count()) >= 1);
  assert.match((await page.locator("#search-status").textContent()) ?? "", /\d+ results? for “token bucket”/);
  await page.locator("#budgets li[data-bucket='search'][data-remaining='4']").waitFor();

  // A report, streamed: the text grows in several steps before the end.
  await page.locator("#topic").fill("rate limiting");
  await page.locator("#max-tokens").fill("40");
  await page.evaluate(() => {
    const report = document.getElementById("report")!;
    const seen: number[] = [];
    (window as unknown as { appends: number[] }).appends = seen;
    new MutationObserver(() => seen.push(performance.now())).observe(report, { childList: true });
  });
  await page.locator("#report-button").focus();
  assert.equal(
    await page.locator("#report-button").evaluate((b) => b.matches(":focus-visible") && getComputedStyle(b).outlineStyle),
    "solid",
    "keyboard focus is visible",
  );
  await page.keyboard.press("Enter");
  await page.locator("#report[data-state='done']").waitFor();
  await page.locator("#usage:not([hidden])").waitFor();
  const doneAt = await page.evaluate(() => performance.now());
  const appends = await page.evaluate(() => (window as unknown as { appends: number[] }).appends);
  assert.ok(appends.length >= 5, `${appends.length} appends to the report, want one per chunk`);
  assert.ok(doneAt - appends[0]! >= 30, `first chunk shown ${doneAt - appends[0]!} ms before the end: not streamed`);
  assert.ok(((await page.locator("#report").textContent()) ?? "").length > 40);

  // The settled usage: the stream's last message, GetQuota's answer, the
  // bars and a GetQuota of our own agree.
  const total = Number(await page.locator("#usage").getAttribute("data-total-tokens"));
  assert.ok(total > 40 && total <= 60, `total tokens ${total}: 40 completion + the prompt`);
  assert.equal(await page.locator("#usage-table tr[data-bucket='generate_tokens']").getAttribute("data-charged"), String(total));
  assert.equal(await page.locator("#usage-table tr[data-bucket='generate_requests']").getAttribute("data-charged"), "1");
  const barTokens = Number(await bucket("generate_tokens").getAttribute("data-remaining"));
  assert.ok(Math.abs(5000 - barTokens - total) < 0.1, `the bar moved from 5000 to ${barTokens}, want by ${total}`);
  const quota = await getQuota(s.api, s.key);
  assert.equal(quota.subject, s.subject);
  const remaining = (name: string) => quota.buckets.find((b) => b.name === name)?.remaining ?? Number.NaN;
  assert.ok(Math.abs(remaining("generate_tokens") - barTokens) < 0.1, `GetQuota says ${remaining("generate_tokens")}, the bar ${barTokens}`);
  const barAll = Number(await bucket("all_ai_tokens").getAttribute("data-remaining"));
  assert.ok(Math.abs(100_000 - 1 - total - barAll) < 0.1, `all_ai_tokens bar ${barAll}, want 100000 - 1 search - ${total}`);
  assert.ok(Math.abs(remaining("all_ai_tokens") - barAll) < 0.1);

  // A second report at once is denied: generate_requests refills one token
  // every 2.5 s. The countdown shows the server's RetryInfo.
  const calls = await page.evaluate(() => (window as unknown as Captured).generateReportBodies.length);
  await page.locator("#report-button").click();
  await page.waitForFunction((n) => (window as unknown as Captured).generateReportBodies.length > n, calls);
  const retryMs = retryInfoMs(await page.evaluate((n) => (window as unknown as Captured).generateReportBodies[n]!, calls));
  const limit = page.locator("#report-limit");
  await page.locator("#report-limit[data-state='waiting']").waitFor();
  const shownAt = Date.now();
  assert.equal(await limit.getAttribute("data-retry-after-ms"), String(retryMs), "the countdown is the server's RetryInfo");
  assert.ok(retryMs > 500 && retryMs <= 2500, `retry in ${retryMs} ms`);
  assert.equal(await limit.getAttribute("data-bucket"), "generate_requests");
  assert.match((await limit.locator(".limit-message").textContent()) ?? "", new RegExp(`“generate_requests” for ${s.subject.replace(/\./g, "\\.")}`));
  assert.match((await limit.locator("[role=timer]").textContent()) ?? "", /^\d+\.\d s$/);
  assert.equal(await page.locator("#report-button").getAttribute("aria-disabled"), "true");
  assert.equal(await page.locator("#report[data-state='limited']").count(), 1);
  await page.screenshot({ path: s.screenshot });
  console.log(`screenshot: ${s.screenshot}`);

  // Clicks while waiting do nothing (force: Playwright itself waits for an
  // aria-disabled button); at the retry time the button comes back.
  await page.locator("#report-button").click({ force: true });
  assert.equal(await page.locator("#report").getAttribute("data-state"), "limited");
  await page.locator("#report-limit[data-state='ready']").waitFor({ timeout: retryMs + 5_000 });
  const waited = Date.now() - shownAt;
  assert.ok(waited >= retryMs - 300, `re-enabled after ${waited} ms, before the retry time (${retryMs} ms)`);
  assert.equal(await page.locator("#report-button").getAttribute("aria-disabled"), null);
  assert.match((await limit.locator(".limit-message").textContent()) ?? "", /available again\.$/);

  // And generating works again.
  await page.locator("#report-button").click();
  await page.locator("#report[data-state='done']").waitFor();
  await page.locator("#usage:not([hidden])").waitFor();
  assert.equal(await page.locator("#usage-table tr[data-bucket='generate_requests']").getAttribute("data-charged"), "1");
  assertNoPageErrors(page);
}

interface PageOptions {
  /** allowConsoleErrors accepts errors in the console (a refused CORS request logs one). */
  readonly allowConsoleErrors?: boolean;
}

const pageErrors = new WeakMap<Page, string[]>();

async function newPage(browser: Browser, opts: PageOptions = {}): Promise<Page> {
  const context = await browser.newContext({ viewport: { width: 1280, height: 1800 } });
  await context.addInitScript(captureGenerateReportBodies);
  const page = await context.newPage();
  const errors: string[] = [];
  pageErrors.set(page, errors);
  page.on("pageerror", (e) => errors.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error" && !opts.allowConsoleErrors) {
      errors.push(`console: ${m.text()}`);
    }
  });
  page.setDefaultTimeout(15_000);
  return page;
}

function assertNoPageErrors(page: Page): void {
  assert.deepEqual(pageErrors.get(page), []);
}

/** Captured is what captureGenerateReportBodies leaves in the page. */
interface Captured {
  generateReportBodies: Promise<{ contentType: string; base64: string }>[];
}

/**
 * captureGenerateReportBodies runs in the page before its scripts: it keeps
 * a copy of the body of every GenerateReport response as it came off the
 * wire (a tee: the page still streams its own). Playwright's own
 * response.body() is not reliable for a fetch read as a stream.
 */
function captureGenerateReportBodies(): void {
  const w = window as unknown as Captured;
  w.generateReportBodies = [];
  const fetch = window.fetch;
  window.fetch = async function (input: RequestInfo | URL, init?: RequestInit) {
    const res = await fetch.call(this, input, init);
    const url = input instanceof Request ? input.url : String(input);
    if (url.endsWith("/aiservice.v1.AIService/GenerateReport") && res.body !== null) {
      // Read the copy eagerly: connect-web aborts the call once it has the
      // stream's end message, which errors a copy not yet read.
      const reader = res.clone().body!.getReader();
      const chunks: Uint8Array[] = [];
      // No named inner functions: tsx would wrap them in a helper that
      // the page does not have.
      w.generateReportBodies.push(
        (async () => {
          try {
            for (let r = await reader.read(); !r.done; r = await reader.read()) {
              chunks.push(r.value);
            }
          } catch {
            // aborted: keep what came
          }
          const bytes = chunks.flatMap((c) => Array.from(c, (b) => String.fromCharCode(b)));
          return { contentType: res.headers.get("Content-Type") ?? "", base64: btoa(bytes.join("")) };
        })(),
      );
    }
    return res;
  };
}

/**
 * retryInfoMs reads the google.rpc.RetryInfo of a denied Connect call from
 * its response body, a unary error or a stream's end message, in whole
 * milliseconds rounded up (as the kit's describeLimit gives it).
 */
function retryInfoMs(res: { contentType: string; base64: string }): number {
  const body = Buffer.from(res.base64, "base64");
  let error: { details?: { type: string; value: string }[] } | undefined;
  if (res.contentType.startsWith("application/connect+")) {
    for (let off = 0; off + 5 <= body.length; ) {
      const flags = body[off]!;
      const len = body.readUInt32BE(off + 1);
      const data = body.subarray(off + 5, off + 5 + len);
      off += 5 + len;
      if (flags & 0x02) {
        error = (JSON.parse(data.toString()) as { error?: typeof error }).error;
      }
    }
  } else {
    error = JSON.parse(body.toString()) as typeof error;
  }
  const detail = error?.details?.find((d) => d.type === "google.rpc.RetryInfo");
  assert.ok(detail !== undefined, `no RetryInfo in the denial: ${body.toString()}`);
  const delay = fromBinary(RetryInfoSchema, Buffer.from(detail.value, "base64")).retryDelay;
  assert.ok(delay !== undefined);
  return Math.ceil(Number(delay.seconds) * 1000 + delay.nanos / 1e6);
}

/** getQuota asks the example for the buckets of key ("" for anonymous), from Node. */
async function getQuota(api: string, key: string): Promise<GetQuotaResponse> {
  const authorize: Interceptor = (next) => (req) => {
    if (key !== "") {
      req.header.set("Authorization", `Bearer ${key}`);
    }
    return next(req);
  };
  const client = createClient(QuotaService, createConnectTransport({ baseUrl: api, interceptors: [authorize] }));
  return client.getQuota({});
}

const contentTypes: Record<string, string> = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
};

/** serveStatic serves dir's files on a free loopback port, as any static host would. */
async function serveStatic(dir: string): Promise<HTTPServer> {
  const server = createServer((req, res) => {
    const path = new URL(req.url ?? "/", "http://x").pathname;
    const name = path === "/" ? "index.html" : path.slice(1);
    const type = contentTypes[extname(name)];
    if (name.includes("/") || name.startsWith(".") || type === undefined) {
      res.writeHead(404).end();
      return;
    }
    readFile(join(dir, name)).then(
      (data) => res.writeHead(200, { "Content-Type": type, "Cache-Control": "no-store" }).end(data),
      () => res.writeHead(404).end(),
    );
  });
  await new Promise<void>((ok, fail) => {
    server.once("error", fail);
    server.listen(0, "127.0.0.1", ok);
  });
  return server;
}
