// The browser demo of examples/aiservice: search, a streamed report, and
// the caller's budgets, through connect-web and @connectlimit/client.
// Built into ../static/app.js by `npm run build:demo` in clients/ts.
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-web";
import {
  createQuotaState,
  createRateLimitInterceptor,
  describeLimit,
  type LimitDescription,
  type QuotaState,
} from "@connectlimit/client";
import { AIService, type Usage } from "@connectlimit/client/gen/aiservice/v1/aiservice_pb";
import { QuotaService, type GetQuotaResponse } from "@connectlimit/client/gen/connectlimit/v1/quota_pb";
import { renderBudgets } from "./budgets.js";
import { Countdown } from "./countdown.js";
import { byId, formatTokens, setDisabled } from "./dom.js";

/** reportTokensBucket is the example's bucket of LLM tokens for reports. */
const reportTokensBucket = "generate_tokens";

/** Session is everything that belongs to one caller (one API key). */
interface Session {
  readonly key: string;
  readonly quota: QuotaState;
  ai: Client<typeof AIService>;
  quotaClient: Client<typeof QuotaService>;
}

const api = apiBaseURL();
const ui = {
  apiURL: byId("api-url"),
  key: byId<HTMLSelectElement>("key"),
  customKeyField: byId("custom-key-field"),
  customKey: byId<HTMLInputElement>("custom-key"),
  retry: byId<HTMLInputElement>("retry"),
  caller: byId("caller"),
  searchForm: byId<HTMLFormElement>("search-form"),
  query: byId<HTMLInputElement>("query"),
  searchButton: byId<HTMLButtonElement>("search-button"),
  searchStatus: byId("search-status"),
  results: byId<HTMLOListElement>("results"),
  reportForm: byId<HTMLFormElement>("report-form"),
  topic: byId<HTMLInputElement>("topic"),
  maxTokens: byId<HTMLInputElement>("max-tokens"),
  reportButton: byId<HTMLButtonElement>("report-button"),
  stopButton: byId<HTMLButtonElement>("stop-button"),
  reportStatus: byId("report-status"),
  report: byId("report"),
  usage: byId("usage"),
  usageSummary: byId("usage-summary"),
  usageRows: byId<HTMLTableElement>("usage-table").tBodies[0]!,
  budgets: byId<HTMLUListElement>("budgets"),
  concurrency: byId("concurrency"),
  refreshButton: byId<HTMLButtonElement>("refresh-button"),
};

/** Action is a button whose calls may be refused for a while. */
class Action {
  busy = false;
  readonly countdown: Countdown;

  constructor(
    readonly button: HTMLButtonElement,
    limitBox: HTMLElement,
    readonly status: HTMLElement,
    readonly name: string,
  ) {
    this.countdown = new Countdown(limitBox, name, () => this.update());
  }

  /** ready tells whether the button may start a call now. */
  ready(): boolean {
    return !this.busy && !this.countdown.active();
  }

  update(): void {
    setDisabled(this.button, !this.ready());
  }

  setBusy(busy: boolean): void {
    this.busy = busy;
    this.update();
  }

  /** fail shows why a call failed: a countdown for a denial that a wait cures. */
  fail(err: unknown): "limited" | "error" {
    const limit = describeLimit(err);
    if (limit?.retryAfterMs !== undefined) {
      this.status.textContent = "";
      this.countdown.start(limit, limit.retryAfterMs);
      this.update();
      return "limited";
    }
    this.status.textContent = limit !== undefined ? noWaitMessage(this.name, limit) : errorMessage(err);
    return "error";
  }
}

const search = new Action(ui.searchButton, byId("search-limit"), ui.searchStatus, "Search");
const generate = new Action(ui.reportButton, byId("report-limit"), ui.reportStatus, "Generate");
let session = newSession("");
let abortReport: AbortController | undefined;

ui.apiURL.textContent = api;
ui.key.addEventListener("change", () => {
  const other = ui.key.value === "other";
  ui.customKeyField.hidden = !other;
  if (other) {
    ui.customKey.focus();
    if (ui.customKey.value.trim() === "") {
      return; // switch once a key is typed
    }
  }
  switchKey(selectedKey());
});
ui.customKey.addEventListener("change", () => switchKey(selectedKey()));
ui.retry.addEventListener("change", () => connect(session));
ui.refreshButton.addEventListener("click", () => void refreshQuota(session));
ui.searchForm.addEventListener("submit", (e) => {
  e.preventDefault();
  void runSearch();
});
ui.reportForm.addEventListener("submit", (e) => {
  e.preventDefault();
  void runReport();
});
ui.stopButton.addEventListener("click", () => abortReport?.abort());
// Buckets refill between calls: redraw the estimates every second.
setInterval(() => renderBudgets(ui.budgets, session.quota.all()), 1000);
void refreshQuota(session);

/** apiBaseURL is ?api=http://host:port, or the page's own origin. */
function apiBaseURL(): string {
  const param = new URLSearchParams(location.search).get("api");
  if (param === null || param.trim() === "") {
    return location.origin;
  }
  try {
    const url = new URL(param.trim(), location.href);
    if (url.protocol === "http:" || url.protocol === "https:") {
      return url.origin + url.pathname.replace(/\/+$/, "");
    }
  } catch {
    // fall through
  }
  document.title = "connectlimit demo (bad ?api=)";
  return location.origin;
}

function selectedKey(): string {
  return ui.key.value === "other" ? ui.customKey.value.trim() : ui.key.value;
}

function newSession(key: string): Session {
  const quota = createQuotaState();
  quota.subscribe(() => {
    if (session.quota === quota) {
      renderBudgets(ui.budgets, quota.all());
    }
  });
  const s = { key, quota } as Session;
  connect(s);
  return s;
}

/** connect (re)creates the session's clients, with the current retry choice. */
function connect(s: Session): void {
  const authorize: Interceptor = (next) => (req) => {
    if (s.key !== "") {
      req.header.set("Authorization", `Bearer ${s.key}`);
    }
    return next(req);
  };
  const transport = createConnectTransport({
    baseUrl: api,
    interceptors: [
      createRateLimitInterceptor({
        state: s.quota,
        retry: ui.retry.checked ? {} : false,
        onRetry: (e) => {
          const action = e.procedure.endsWith("/Search") ? search : generate;
          const bucket = describeLimit(e.error)?.bucket ?? "a bucket";
          action.status.textContent = `Limited by ${bucket}: retrying in ${(e.delayMs / 1000).toFixed(1)} s…`;
        },
      }),
      authorize,
    ],
  });
  s.ai = createClient(AIService, transport);
  s.quotaClient = createClient(QuotaService, transport);
}

function switchKey(key: string): void {
  if (key === session.key) {
    return;
  }
  abortReport?.abort();
  session = newSession(key);
  search.countdown.cancel();
  generate.countdown.cancel();
  search.update();
  generate.update();
  ui.budgets.replaceChildren();
  ui.concurrency.textContent = "";
  void refreshQuota(session);
}

/** getQuota asks for the caller's buckets and records them in the session's state. */
async function getQuota(s: Session): Promise<GetQuotaResponse> {
  const res = await s.quotaClient.getQuota({});
  s.quota.applyQuota(res);
  return res;
}

async function refreshQuota(s: Session): Promise<void> {
  try {
    const res = await getQuota(s);
    if (s !== session) {
      return;
    }
    ui.caller.dataset["subject"] = res.subject;
    ui.caller.dataset["tier"] = res.tier;
    ui.caller.textContent = `You call as ${res.subject}, in tier ${res.tier}.`;
    ui.concurrency.textContent = res.concurrency
      .map((c) => `${c.name}: at most ${c.limit} ${c.limit === 1 ? "report" : "reports"} generating at once.`)
      .join(" ");
  } catch (err) {
    if (s === session) {
      ui.caller.dataset["subject"] = "";
      ui.caller.textContent = `GetQuota failed: ${errorMessage(err)}`;
    }
  }
}

async function runSearch(): Promise<void> {
  if (!search.ready()) {
    return;
  }
  const query = ui.query.value.trim();
  search.setBusy(true);
  search.countdown.hide();
  ui.searchStatus.textContent = "Searching…";
  try {
    const res = await session.ai.search({ query, topK: 5 });
    ui.results.replaceChildren(
      ...res.results.map((r) => {
        const li = document.createElement("li");
        const title = document.createElement("strong");
        title.textContent = r.title;
        const score = document.createElement("span");
        score.className = "score";
        score.textContent = `score ${r.score.toFixed(2)}`;
        const snippet = document.createElement("p");
        snippet.textContent = r.snippet;
        li.append(title, " ", score, snippet);
        return li;
      }),
    );
    const n = res.results.length;
    ui.searchStatus.textContent = n === 0 ? `No results for “${query}”.` : `${n} ${n === 1 ? "result" : "results"} for “${query}”.`;
  } catch (err) {
    search.fail(err);
  } finally {
    search.setBusy(false);
  }
}

async function runReport(): Promise<void> {
  if (!generate.ready()) {
    return;
  }
  const s = session;
  const topic = ui.topic.value.trim();
  const maxTokens = Number(ui.maxTokens.value);
  const abort = new AbortController();
  abortReport = abort;
  generate.setBusy(true);
  generate.countdown.hide();
  ui.stopButton.hidden = false;
  // The previous report stays until this one's first chunk: a denied call
  // leaves it in place.
  ui.report.dataset["state"] = "streaming";
  ui.report.setAttribute("aria-busy", "true");
  ui.reportStatus.textContent = "Generating…";

  // GetQuota before and after gives the charge the report settled to.
  const before = await getQuota(s).catch(() => undefined);
  const beforeAt = performance.now();
  let usage: Usage | undefined;
  let reserved: number | undefined;
  let tokens = 0;
  let outcome: "done" | "stopped" | "limited" | "error" = "done";
  try {
    for await (const msg of s.ai.generateReport({ topic, maxTokens }, { signal: abort.signal })) {
      if (reserved === undefined) {
        ui.usage.hidden = true;
        ui.report.replaceChildren();
        // The stream's headers, recorded by the kit, show its reservation.
        const b = before?.buckets.find((q) => q.name === reportTokensBucket);
        const now = s.quota.get(reportTokensBucket);
        reserved = b !== undefined && now !== undefined ? Math.floor(b.remaining - now.remaining) : Number.NaN;
      }
      ui.report.append(msg.text);
      tokens += msg.tokens;
      usage = msg.usage ?? usage;
    }
  } catch (err) {
    if (abort.signal.aborted) {
      outcome = "stopped";
    } else {
      outcome = generate.fail(err);
    }
  } finally {
    if (abortReport === abort) {
      abortReport = undefined;
    }
    ui.stopButton.hidden = true;
    ui.report.removeAttribute("aria-busy");
    generate.setBusy(false);
  }
  ui.report.dataset["state"] = outcome;
  if (outcome === "stopped" && reserved === undefined) {
    ui.report.replaceChildren(); // stopped before its first chunk
  }
  // A refused call was never charged (fail showed why); nor is a report
  // of a caller the user switched away from shown.
  if (outcome === "limited" || (outcome === "error" && tokens === 0) || s !== session) {
    return;
  }
  const after = await getQuota(s).catch(() => undefined);
  const elapsedSeconds = (performance.now() - beforeAt) / 1000;
  showUsage(outcome, tokens, usage, reserved, before, after, elapsedSeconds);
}

function showUsage(
  outcome: "done" | "stopped" | "error",
  tokens: number,
  usage: Usage | undefined,
  reserved: number | undefined,
  before: GetQuotaResponse | undefined,
  after: GetQuotaResponse | undefined,
  elapsedSeconds: number,
): void {
  const parts: string[] = [];
  if (usage !== undefined) {
    parts.push(
      `The report used ${formatTokens(usage.totalTokens)} tokens: ${formatTokens(usage.promptTokens)} prompt + ` +
        `${formatTokens(usage.completionTokens)} completion (the stream's last message).`,
    );
    ui.usage.dataset["totalTokens"] = String(usage.totalTokens);
  } else {
    parts.push(`The report was ${outcome === "stopped" ? "stopped" : "cut off"} after ${formatTokens(tokens)} completion tokens.`);
    delete ui.usage.dataset["totalTokens"];
  }
  if (reserved !== undefined && Number.isFinite(reserved)) {
    parts.push(`It reserved ${formatTokens(reserved)} ${reportTokensBucket} tokens when it started.`);
  }
  ui.usageSummary.textContent = parts.join(" ");
  ui.usageRows.replaceChildren();
  if (before !== undefined && after !== undefined) {
    for (const b of after.buckets) {
      const prev = before.buckets.find((p) => p.name === b.name);
      if (prev === undefined) {
        continue;
      }
      // What the bucket lost, plus what it refilled meanwhile: the charge.
      // A bucket that was full lost that refill, so it may read a fraction
      // high; whole tokens hide it.
      const charged = Math.round(prev.remaining - b.remaining + b.refillPerSecond * elapsedSeconds);
      if (charged === 0) {
        continue;
      }
      const tr = document.createElement("tr");
      tr.dataset["bucket"] = b.name;
      tr.dataset["charged"] = String(charged);
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = b.name;
      tr.append(th, cell(Math.floor(prev.remaining)), cell(Math.floor(b.remaining)), cell(charged));
      ui.usageRows.append(tr);
    }
  }
  ui.usage.hidden = false;
  ui.reportStatus.textContent =
    outcome === "done"
      ? `Report complete: ${formatTokens(usage?.totalTokens ?? tokens)} tokens.`
      : `Report ${outcome === "stopped" ? "stopped" : "cut off"}: ${formatTokens(tokens)} completion tokens.`;
}

function cell(n: number): HTMLTableCellElement {
  const td = document.createElement("td");
  td.textContent = formatTokens(n);
  return td;
}

function noWaitMessage(action: string, limit: LimitDescription): string {
  const what = limit.bucket !== undefined ? ` by ${limit.bucket}` : "";
  return `${action} refused${what}, and waiting will not help: ${limit.message}`;
}

function errorMessage(err: unknown): string {
  const e = ConnectError.from(err);
  if (e.code === Code.Unknown && e.cause instanceof TypeError) {
    return `cannot reach the API at ${api} (${e.rawMessage}). Is the server running, and does it allow this page's origin (cors.allowed_origins)?`;
  }
  return `${codeName(e.code)}: ${e.rawMessage}`;
}

/** codeName is Connect's name of a code, as "resource_exhausted". */
function codeName(code: Code): string {
  return (Code[code] ?? String(code)).replace(/[a-z][A-Z]/g, (m) => `${m[0]}_${m[1]}`).toLowerCase();
}
