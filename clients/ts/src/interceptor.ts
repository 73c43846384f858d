import {
  Code,
  ConnectError,
  type Interceptor,
  type StreamRequest,
  type StreamResponse,
  type UnaryRequest,
  type UnaryResponse,
} from "@connectrpc/connect";
import { headerRateLimit, headerRateLimitPolicy, headerRetryAfter, headerWarning } from "./headers.js";
import { annotatedCharges, chargesKey, delayMs, mergeCharges, type Charge } from "./pacing.js";
import { resolveRetry, retryWaitMs, type RetryOptions } from "./retry.js";
import { createQuotaState, type QuotaState } from "./state.js";

/** PacingOptions configure client-side pacing; see {@link RateLimitInterceptorOptions.pacing}. */
export interface PacingOptions {
  /**
   * charges maps procedures ("/package.Service/Method") to what one call
   * costs, replacing the method's annotation for the procedures it names (as
   * the server's `procedures:` configuration does). Default: none.
   */
  readonly charges?: Readonly<Record<string, readonly Charge[]>>;
  /**
   * annotations makes the fixed costs of each method's
   * `(connectlimit.v1.limit)` annotation its charges, read from the
   * generated descriptor. Costs the server estimates from the request are
   * not there: name them per call with {@link chargesKey}. Default true.
   */
  readonly annotations?: boolean;
  /**
   * maxHoldMs is the longest a call is held. A call whose estimated wait
   * does not fit in what is left of it is sent at once, for the server to
   * decide (and deny with RetryInfo, which the retry policy then handles).
   * Default 10 000 (10 s).
   */
  readonly maxHoldMs?: number;
}

/** RetryEvent tells that a denied call will be sent again. */
export interface RetryEvent {
  /** procedure is the call's procedure, "/package.Service/Method". */
  readonly procedure: string;
  /** attempt counts the attempts made so far, the denied one included. */
  readonly attempt: number;
  /** delayMs is how long the call waits before its next attempt. */
  readonly delayMs: number;
  /** error is the denial. */
  readonly error: ConnectError;
}

/** HoldEvent tells that a call is held by client-side pacing. */
export interface HoldEvent {
  /** procedure is the call's procedure, "/package.Service/Method". */
  readonly procedure: string;
  /**
   * delayMs is the estimated wait before the call can be paid, in
   * milliseconds; Infinity while only the answers of calls in flight can
   * tell (the call is then held until one comes, at most maxHoldMs).
   */
  readonly delayMs: number;
  /** charges is what the call was estimated to cost. */
  readonly charges: readonly Charge[];
}

/** RateLimitInterceptorOptions configure {@link createRateLimitInterceptor}; every field is optional. */
export interface RateLimitInterceptorOptions {
  /**
   * state receives the RateLimit fields of every response: headers, the
   * trailers of a stream that ended, and the metadata of errors (a denial,
   * a stream cut off). Default: a new state that only pacing reads; pass
   * one (from createQuotaState) to show it.
   */
  readonly state?: QuotaState;
  /**
   * retry bounds the retries of denied calls, or false turns them off. Only
   * a resource_exhausted error with a google.rpc.RetryInfo detail is
   * retried: no wait cures a denial without one (a cost over capacity, a
   * concurrency limit). A stream is retried only while it has delivered no
   * message, and only if it is a server stream (its one request message can
   * be sent again). Default: 3 attempts, waits of at most 10 s each and 20 s
   * in all, 20% jitter (see {@link RetryOptions}).
   */
  readonly retry?: RetryOptions | false;
  /**
   * pacing holds a call locally until the last known state of the buckets
   * it draws from says it can pay, instead of sending a call that the
   * server will certainly deny. A call's charges come from `pacing.charges`
   * or the method's annotation, plus {@link chargesKey} per call; a call
   * with none, or whose buckets were never seen, is sent at once. Calls
   * sent and not yet answered count against their buckets. true enables it
   * with the defaults of {@link PacingOptions}. Default false.
   */
  readonly pacing?: PacingOptions | boolean;
  /** onRetry is called before each wait for a retry. Default: none. */
  readonly onRetry?: (event: RetryEvent) => void;
  /** onHold is called each time pacing holds a call for a while. Default: none. */
  readonly onHold?: (event: HoldEvent) => void;
}

/** Clock is the time source of the interceptor; tests replace it. */
export interface Clock {
  /** now returns milliseconds since the epoch. */
  now(): number;
  /** random returns a number in [0, 1). */
  random(): number;
  /** sleep resolves after ms, or rejects with signal.reason once signal aborts. */
  sleep(ms: number, signal: AbortSignal): Promise<void>;
}

/** systemClock is the real time source. */
export const systemClock: Clock = {
  now: () => Date.now(),
  random: () => Math.random(),
  sleep(ms, signal) {
    return new Promise((resolve, reject) => {
      if (signal.aborted) {
        reject(signal.reason);
        return;
      }
      const onAbort = () => {
        clearTimeout(timer);
        reject(signal.reason);
      };
      const timer = setTimeout(() => {
        signal.removeEventListener("abort", onAbort);
        resolve();
      }, ms);
      signal.addEventListener("abort", onAbort, { once: true });
    });
  },
};

/**
 * createRateLimitInterceptor returns a connect-es Interceptor for clients of
 * connectlimit servers (unary calls and every kind of stream). It
 *
 * - records the RateLimit, RateLimit-Policy and Connectlimit-Warning fields
 *   of responses, stream trailers and errors into `options.state`;
 * - retries resource_exhausted denials that carry a google.rpc.RetryInfo,
 *   after waiting their delay plus jitter, within `options.retry`'s bounds;
 * - with `options.pacing`, holds calls until their buckets can pay.
 *
 * Waits honour the call's AbortSignal (its `signal` option and its timeout):
 * an aborted wait rejects at once with code canceled (or deadline_exceeded
 * for a timeout), and no further attempt is sent.
 *
 * ```ts
 * const state = createQuotaState();
 * const transport = createConnectTransport({
 *   baseUrl: "https://api.example.com",
 *   interceptors: [createRateLimitInterceptor({ state, pacing: true })],
 * });
 * ```
 */
export function createRateLimitInterceptor(options: RateLimitInterceptorOptions = {}): Interceptor {
  return newRateLimitInterceptor(options, systemClock);
}

const wake = Symbol("wake");

/** newRateLimitInterceptor is createRateLimitInterceptor with a given clock. */
export function newRateLimitInterceptor(options: RateLimitInterceptorOptions, clock: Clock): Interceptor {
  const state = options.state ?? createQuotaState();
  const retry = resolveRetry(options.retry);
  const pacing: PacingOptions | undefined =
    options.pacing === true ? {} : options.pacing === false || options.pacing === undefined ? undefined : options.pacing;
  const maxHoldMs = Math.max(0, pacing?.maxHoldMs ?? 10_000);
  const useAnnotations = pacing?.annotations ?? true;

  // Charges of calls released by pacing and not yet answered.
  const pending = new Set<readonly Charge[]>();
  const releaseListeners = new Set<() => void>();

  function pendingIn(bucket: string): number {
    let sum = 0;
    for (const charges of pending) {
      for (const c of charges) {
        if (c.bucket === bucket) {
          sum += c.cost;
        }
      }
    }
    return sum;
  }

  function chargesOf(req: UnaryRequest | StreamRequest, procedure: string): Charge[] {
    if (pacing === undefined) {
      return [];
    }
    const base = pacing.charges?.[procedure] ?? (useAnnotations ? annotatedCharges(req.method) : []);
    return mergeCharges(base, req.contextValues.get(chargesKey));
  }

  /** hold waits until charges can be paid, then returns their release. */
  async function hold(procedure: string, charges: readonly Charge[], signal: AbortSignal): Promise<() => void> {
    if (charges.length === 0) {
      return () => {};
    }
    const start = clock.now();
    for (;;) {
      const now = clock.now();
      let wait = 0;
      for (const c of charges) {
        wait = Math.max(wait, delayMs(state.get(c.bucket), c.cost, pendingIn(c.bucket), now));
      }
      const left = maxHoldMs - (now - start);
      if (wait <= 0 || left <= 0 || (wait !== Infinity && wait > left)) {
        break;
      }
      options.onHold?.({ procedure, delayMs: wait, charges });
      await sleepOrWake(Math.min(wait, left), signal);
    }
    pending.add(charges);
    let released = false;
    return () => {
      if (!released) {
        released = true;
        pending.delete(charges);
        for (const l of [...releaseListeners]) {
          l();
        }
      }
    };
  }

  /**
   * sendTime is the sentAt of a call sent now: a millisecond early, so
   * that an answer to another call observed within the same millisecond
   * (the clock's resolution) counts as observed after it.
   */
  function sendTime(): number {
    return clock.now() - 1;
  }

  /** sleepOrWake sleeps ms, less if the state changes or a call is answered. */
  async function sleepOrWake(ms: number, signal: AbortSignal): Promise<void> {
    const inner = new AbortController();
    const onAbort = () => inner.abort(signal.reason);
    const onChange = () => inner.abort(wake);
    signal.addEventListener("abort", onAbort, { once: true });
    const unsubscribe = state.subscribe(onChange);
    releaseListeners.add(onChange);
    try {
      if (signal.aborted) {
        throw signal.reason;
      }
      await clock.sleep(ms, inner.signal);
    } catch (e) {
      if (e !== wake) {
        throw canceled(e);
      }
    } finally {
      signal.removeEventListener("abort", onAbort);
      unsubscribe();
      releaseListeners.delete(onChange);
    }
  }

  async function sleep(ms: number, signal: AbortSignal): Promise<void> {
    try {
      if (signal.aborted) {
        throw signal.reason;
      }
      await clock.sleep(ms, signal);
    } catch (e) {
      throw canceled(e);
    }
  }

  /**
   * observe records the fields of headers, which answer a call sent at
   * sentAt (see QuotaState.applyHeaders), and returns when it observed them.
   */
  function observe(headers: Headers, sentAt: number): number {
    const at = clock.now();
    state.applyHeaders(headers, at, sentAt);
    return at;
  }

  /**
   * observeError records the fields of an error's metadata. connect-es
   * appends a stream's response headers to the trailers in the metadata of
   * an error that ends it; with header given, those are taken out again so
   * that the trailers' newer values count.
   */
  function observeError(e: unknown, header: Headers | undefined, sentAt: number): void {
    if (!(e instanceof ConnectError)) {
      return;
    }
    if (header === undefined) {
      observe(e.metadata, sentAt);
      return;
    }
    const fields = new Headers();
    for (const name of [headerRateLimit, headerRateLimitPolicy, headerWarning, headerRetryAfter]) {
      const value = withoutSuffix(e.metadata.get(name), header.get(name));
      if (value !== undefined) {
        fields.set(name, value);
      }
    }
    observe(fields, sentAt);
  }

  function retryAfter(e: unknown, attempt: number, waited: number, procedure: string): number | undefined {
    const wait = retryWaitMs(e, attempt, waited, retry, () => clock.random());
    if (wait !== undefined && e instanceof ConnectError) {
      options.onRetry?.({ procedure, attempt, delayMs: wait, error: e });
    }
    return wait;
  }

  async function unary(
    next: (req: UnaryRequest) => Promise<UnaryResponse>,
    req: UnaryRequest,
    procedure: string,
    charges: readonly Charge[],
  ): Promise<UnaryResponse> {
    let waited = 0;
    for (let attempt = 1; ; attempt++) {
      const release = await hold(procedure, charges, req.signal);
      const sentAt = sendTime();
      let res: UnaryResponse;
      try {
        res = await next(req);
      } catch (e) {
        observeError(e, undefined, sentAt);
        release();
        const wait = retryAfter(e, attempt, waited, procedure);
        if (wait === undefined) {
          throw e;
        }
        await sleep(wait, req.signal);
        waited += wait;
        continue;
      }
      // The trailers come after the headers the call itself recorded.
      observe(res.trailer, observe(res.header, sentAt));
      release();
      return res;
    }
  }

  async function stream(
    next: (req: StreamRequest) => Promise<StreamResponse>,
    req: StreamRequest,
    procedure: string,
    charges: readonly Charge[],
  ): Promise<StreamResponse> {
    // A server stream sends one request message: keep it to send it again.
    // Client and bidi streams send as they go, so they are never retried.
    const replayable = req.method.methodKind === "server_streaming";
    const input: unknown[] = [];
    if (replayable) {
      for await (const m of req.message) {
        input.push(m);
      }
    }
    const request = (): StreamRequest => (replayable ? { ...req, message: iterate(input) as StreamRequest["message"] } : req);
    let attempt = 0;
    let waited = 0;

    // sentAt is when the current attempt was sent, and then when its
    // headers were recorded, which its trailers come after.
    let sentAt = 0;
    async function start(): Promise<StreamResponse> {
      for (;;) {
        attempt++;
        const release = await hold(procedure, charges, req.signal);
        sentAt = sendTime();
        try {
          const res = await next(request());
          sentAt = observe(res.header, sentAt); // the reservation, or a denial before any message
          release();
          return res;
        } catch (e) {
          observeError(e, undefined, sentAt);
          release();
          const wait = replayable ? retryAfter(e, attempt, waited, procedure) : undefined;
          if (wait === undefined) {
            throw e;
          }
          await sleep(wait, req.signal);
          waited += wait;
        }
      }
    }

    let current = await start();
    const header = new Headers(current.header);
    const trailer = new Headers();
    async function* messages(): AsyncGenerator<unknown> {
      let delivered = false;
      for (;;) {
        try {
          for await (const m of current.message) {
            delivered = true;
            yield m;
          }
        } catch (e) {
          observeError(e, current.header, sentAt);
          const wait = replayable && !delivered ? retryAfter(e, attempt, waited, procedure) : undefined;
          if (wait === undefined) {
            throw e;
          }
          await sleep(wait, req.signal);
          waited += wait;
          current = await start();
          replaceAll(header, current.header);
          continue;
        }
        observe(current.trailer, sentAt);
        replaceAll(trailer, current.trailer);
        return;
      }
    }
    return { ...current, header, trailer, message: messages() as StreamResponse["message"] };
  }

  return (next) => async (req) => {
    const procedure = `/${req.service.typeName}/${req.method.name}`;
    const charges = chargesOf(req, procedure);
    if (req.stream) {
      return stream(next as (req: StreamRequest) => Promise<StreamResponse>, req, procedure, charges);
    }
    return unary(next as (req: UnaryRequest) => Promise<UnaryResponse>, req, procedure, charges);
  };
}

async function* iterate<T>(items: readonly T[]): AsyncGenerator<T> {
  yield* items;
}

function replaceAll(target: Headers, source: Headers): void {
  for (const key of [...target.keys()]) {
    target.delete(key);
  }
  source.forEach((value, key) => target.append(key, value));
}

/**
 * withoutSuffix returns value less a trailing (or leading) ", " + suffix,
 * undefined if nothing is left.
 */
export function withoutSuffix(value: string | null, suffix: string | null): string | undefined {
  if (value === null) {
    return undefined;
  }
  if (suffix === null || suffix === "") {
    return value;
  }
  if (value === suffix) {
    return undefined;
  }
  if (value.endsWith(", " + suffix)) {
    return value.slice(0, value.length - suffix.length - 2);
  }
  if (value.startsWith(suffix + ", ")) {
    return value.slice(suffix.length + 2);
  }
  return value;
}

/** canceled converts the reason of an aborted wait into a ConnectError. */
function canceled(reason: unknown): ConnectError {
  return ConnectError.from(reason, Code.Canceled);
}
