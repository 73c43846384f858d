import type { GetQuotaResponse } from "./gen/connectlimit/v1/quota_pb.js";
import { parseRateLimitFields } from "./fields.js";
import { estimateRemaining } from "./pacing.js";

/**
 * BucketState is what a client last learned about one of its buckets. Values
 * are frozen: an update replaces the object, so `===` tells whether a bucket
 * changed.
 */
export interface BucketState {
  /** bucket is the bucket's name, as the server's configuration names it. */
  readonly bucket: string;
  /**
   * remaining is how many tokens the bucket held at updatedAt. From response
   * headers it is whole tokens, never below 0; from GetQuota it is exact and
   * negative while the bucket is in debt. Use {@link estimateRemaining} for
   * the level now, refill included.
   */
  readonly remaining: number;
  /** limit is the bucket's capacity in tokens (RateLimit-Policy's q), once known. */
  readonly limit: number | undefined;
  /**
   * windowSeconds is how long the bucket takes to refill from empty
   * (RateLimit-Policy's w, rounded up to whole seconds), once known.
   */
  readonly windowSeconds: number | undefined;
  /**
   * refillPerSecond is how many tokens come back each second: exact when
   * seeded by GetQuota, else estimated as limit / windowSeconds (a slight
   * underestimate, since w is rounded up).
   */
  readonly refillPerSecond: number | undefined;
  /**
   * resetAt is when the bucket is full again, in milliseconds since the
   * epoch (updatedAt plus RateLimit's t seconds, or GetQuota's reset_after),
   * or undefined when the server did not say.
   */
  readonly resetAt: number | undefined;
  /** updatedAt is when this state was observed, in milliseconds since the epoch. */
  readonly updatedAt: number;
  /**
   * warning is set when the latest response listed this bucket in
   * Connectlimit-Warning: it is below the server's warning fraction of its
   * capacity (10% by default), so callers should slow down before they are
   * denied.
   */
  readonly warning?: { readonly remaining: number; readonly limit: number };
}

/**
 * QuotaListener is called after every change of a {@link QuotaState}, with
 * the names of the buckets that changed (all of them after clear).
 */
export type QuotaListener = (buckets: readonly string[]) => void;

/**
 * QuotaState holds the last known state of each of the caller's buckets. It
 * is a small observable store with no framework dependency: React can read
 * it with `useSyncExternalStore(state.subscribe, state.all)`, Vue or Svelte
 * by copying {@link QuotaState.all} into their own reactive value in a
 * listener.
 *
 * Updates are synchronous and listeners run before the update returns. A
 * listener that throws does not stop the others or the RPC that caused the
 * update; its error is rethrown in a microtask.
 */
export interface QuotaState {
  /** get returns the last known state of bucket, or undefined if none was seen. */
  get(bucket: string): BucketState | undefined;
  /**
   * all returns every known bucket, sorted by name. The array is frozen and
   * is the same object until the state changes, as useSyncExternalStore needs.
   */
  all(): readonly BucketState[];
  /**
   * subscribe calls listener after every change until the returned function
   * is called. Subscribing one function twice registers it once.
   */
  subscribe(listener: QuotaListener): () => void;
  /**
   * applyHeaders records the buckets listed in the RateLimit,
   * RateLimit-Policy and Connectlimit-Warning fields of headers (response
   * headers, trailers or a ConnectError's metadata), as observed at `at`
   * (milliseconds since the epoch; default now). Malformed fields are
   * ignored. A bucket listed in RateLimit and not in the warning field loses
   * its warning.
   *
   * `sentAt`, when given, is when the call that got headers was sent.
   * Responses to calls in flight at once can arrive in another order than
   * the server decided them, so a bucket state observed after `sentAt` may
   * be newer than these headers: such a bucket keeps the lower of the two
   * estimates (see estimateRemaining), so that a late answer never makes the
   * state show tokens that later calls already spent. Without `sentAt` the
   * headers replace what they list.
   */
  applyHeaders(headers: Headers, at?: number, sentAt?: number): void;
  /**
   * applyQuota records every bucket of a connectlimit.v1.QuotaService/GetQuota
   * answer, as observed at `at` (default now): exact remaining tokens,
   * capacity, refill rate and reset time. Use it to seed the state before the
   * first call, or to refresh a dashboard.
   */
  applyQuota(response: GetQuotaResponse, at?: number): void;
  /** clear forgets every bucket, for example when the user signs out. */
  clear(): void;
}

/**
 * createQuotaState returns an empty {@link QuotaState}. Pass it to
 * createRateLimitInterceptor to have it updated from every response, and
 * share one state among the transports of one caller (one API key).
 */
export function createQuotaState(): QuotaState {
  const buckets = new Map<string, BucketState>();
  const listeners = new Set<QuotaListener>();
  let snapshot: readonly BucketState[] | undefined;

  function commit(changed: BucketState[]): void {
    if (changed.length === 0) {
      return;
    }
    for (const b of changed) {
      buckets.set(b.bucket, Object.freeze(b));
    }
    notify(changed.map((b) => b.bucket));
  }

  function notify(names: readonly string[]): void {
    snapshot = undefined;
    const frozen = Object.freeze([...names]);
    for (const listener of [...listeners]) {
      try {
        listener(frozen);
      } catch (e) {
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }

  return {
    get(bucket) {
      return buckets.get(bucket);
    },
    all() {
      snapshot ??= Object.freeze(
        [...buckets.values()].sort((a, b) => (a.bucket < b.bucket ? -1 : a.bucket > b.bucket ? 1 : 0)),
      );
      return snapshot;
    },
    subscribe(listener) {
      listeners.add(listener);
      return () => {
        listeners.delete(listener);
      };
    },
    applyHeaders(headers, at = Date.now(), sentAt = undefined) {
      const fields = parseRateLimitFields(headers);
      const changed: BucketState[] = [];
      for (const [name, rl] of fields.rateLimit) {
        const prev = buckets.get(name);
        const policy = fields.policy.get(name);
        const limit = policy?.quota ?? prev?.limit;
        const windowSeconds = policy?.windowSeconds ?? prev?.windowSeconds;
        let refillPerSecond = prev?.refillPerSecond;
        // Keep an exact rate from GetQuota while the policy agrees with it;
        // otherwise estimate it from the policy.
        if (
          limit !== undefined &&
          windowSeconds !== undefined &&
          windowSeconds > 0 &&
          !(
            refillPerSecond !== undefined &&
            refillPerSecond > 0 &&
            prev?.limit === limit &&
            Math.ceil(limit / refillPerSecond) === windowSeconds
          )
        ) {
          refillPerSecond = limit / windowSeconds;
        }
        const warn = fields.warning.get(name);
        const next: BucketState = {
          bucket: name,
          remaining: rl.remaining,
          limit,
          windowSeconds,
          refillPerSecond,
          resetAt: rl.resetSeconds === undefined ? undefined : at + rl.resetSeconds * 1000,
          updatedAt: at,
        };
        if (
          sentAt !== undefined &&
          prev !== undefined &&
          prev.updatedAt > sentAt &&
          estimateRemaining(prev, at) < estimateRemaining(next, at)
        ) {
          // Observed after this call was sent, and lower: perhaps the
          // answer of a call the server decided after this one.
          continue;
        }
        changed.push(warn === undefined ? next : { ...next, warning: Object.freeze({ remaining: warn.remaining, limit: warn.quota }) });
      }
      // A policy alone (no RateLimit item) only refreshes a known limit.
      for (const [name, policy] of fields.policy) {
        const prev = buckets.get(name);
        if (fields.rateLimit.has(name) || prev === undefined) {
          continue;
        }
        if (prev.limit !== policy.quota || prev.windowSeconds !== policy.windowSeconds) {
          const w = policy.windowSeconds;
          changed.push({
            ...prev,
            limit: policy.quota,
            windowSeconds: w,
            refillPerSecond: w !== undefined && w > 0 ? policy.quota / w : prev.refillPerSecond,
          });
        }
      }
      commit(changed);
    },
    applyQuota(response, at = Date.now()) {
      const changed: BucketState[] = [];
      for (const b of response.buckets) {
        const reset = b.resetAfter;
        changed.push({
          bucket: b.name,
          remaining: b.remaining,
          limit: b.capacity,
          windowSeconds: b.refillPerSecond > 0 ? Math.ceil(b.capacity / b.refillPerSecond) : undefined,
          refillPerSecond: b.refillPerSecond,
          resetAt: reset === undefined ? undefined : at + Number(reset.seconds) * 1000 + reset.nanos / 1e6,
          updatedAt: at,
        });
      }
      commit(changed);
    },
    clear() {
      if (buckets.size === 0) {
        return;
      }
      const names = [...buckets.keys()];
      buckets.clear();
      notify(names);
    },
  };
}
