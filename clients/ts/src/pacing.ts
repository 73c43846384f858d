import { createContextKey, type ContextKey } from "@connectrpc/connect";
import { getOption, hasOption, type DescMethod } from "@bufbuild/protobuf";
import { limit } from "./gen/connectlimit/v1/options_pb.js";
import type { BucketState } from "./state.js";

/** Charge is what a call costs in one bucket, in tokens. */
export interface Charge {
  /** bucket is the bucket's name, as the server's configuration names it. */
  readonly bucket: string;
  /** cost is the tokens the call takes from bucket; it must be finite and > 0. */
  readonly cost: number;
}

/**
 * chargesKey names, per call, what the call will cost, for client-side
 * pacing. Its entries are added to the procedure's charges (from the
 * `pacing.charges` option or the method's `(connectlimit.v1.limit)`
 * annotation), replacing any for the same bucket. Use it for costs the
 * server estimates from the request, which the client cannot read from the
 * annotation:
 *
 * ```ts
 * const contextValues = createContextValues().set(chargesKey, [
 *   { bucket: "generate_tokens", cost: 8 + maxTokens },
 * ]);
 * client.generateReport({ topic, maxTokens }, { contextValues });
 * ```
 *
 * Default: undefined (the procedure's charges only).
 */
export const chargesKey: ContextKey<readonly Charge[] | undefined> = createContextKey<readonly Charge[] | undefined>(
  undefined,
  { description: "connectlimit charges" },
);

const annotated = new WeakMap<DescMethod, readonly Charge[]>();

/**
 * annotatedCharges returns the fixed costs of a method's
 * `(connectlimit.v1.limit)` annotation: `bucket` with `cost` (default 1), and
 * each charge with a `cost` or neither cost nor estimate (1). Charges with an
 * `estimate` are left out, since only the server evaluates CEL.
 */
export function annotatedCharges(method: DescMethod): readonly Charge[] {
  let charges = annotated.get(method);
  if (charges !== undefined) {
    return charges;
  }
  const out: Charge[] = [];
  if (hasOption(method, limit)) {
    const l = getOption(method, limit);
    if (l.bucket !== "") {
      out.push({ bucket: l.bucket, cost: l.cost ?? 1 });
    }
    for (const c of l.charges) {
      if (c.estimate === "") {
        out.push({ bucket: c.bucket, cost: c.cost ?? 1 });
      }
    }
  }
  charges = Object.freeze(out);
  annotated.set(method, charges);
  return charges;
}

/**
 * mergeCharges returns base with extra added, an entry of extra replacing one
 * of base for the same bucket. Entries whose cost is not finite and > 0 are
 * dropped.
 */
export function mergeCharges(base: readonly Charge[], extra: readonly Charge[] | undefined): Charge[] {
  const byBucket = new Map<string, Charge>();
  for (const c of [...base, ...(extra ?? [])]) {
    if (Number.isFinite(c.cost) && c.cost > 0 && c.bucket !== "") {
      byBucket.set(c.bucket, c);
    }
  }
  return [...byBucket.values()];
}

/**
 * estimateRemaining returns how many tokens a bucket holds at `at`
 * (milliseconds since the epoch; default now), from its last known state and
 * its refill. The estimate errs low: the headers round remaining
 * tokens down and the times until full and to refill up, and they are read
 * after the server decided (but see the caveat on debt below). It may be
 * negative while the bucket is in debt: RateLimit's r is never below 0, so
 * when it is 0 the time until full tells how deep. That is exact when the
 * refill rate is (after applyQuota, or when the bucket refills from empty in
 * a whole number of seconds, as any `period:` configuration does); otherwise
 * the debt may be estimated up to one second of refill too shallow.
 * Without a known refill rate it is the last remaining value, or the limit
 * once resetAt has passed.
 */
export function estimateRemaining(state: BucketState, at: number = Date.now()): number {
  const { limit: capacity, resetAt, updatedAt } = state;
  if (capacity !== undefined && resetAt !== undefined && at >= resetAt) {
    return capacity;
  }
  const level = levelAtUpdate(state);
  const rate = state.refillPerSecond;
  if (rate === undefined || rate <= 0) {
    return level;
  }
  const refilled = level + (rate * Math.max(0, at - updatedAt)) / 1000;
  return capacity === undefined ? refilled : Math.min(capacity, refilled);
}

/**
 * levelAtUpdate is the bucket's level when it was observed. RateLimit's r is
 * never below 0, so when it is 0 the bucket may be in debt; t then says how
 * deep: the bucket is full again t seconds later at refillPerSecond, so it
 * held limit − t·refillPerSecond. That is exact (t rounds up, so errs low)
 * when the refill rate is exact: after GetQuota, or when the bucket refills
 * from empty in a whole number of seconds (any `period:` configuration).
 * Otherwise w was rounded up and the estimate of a debt may be less than one
 * second of refill too shallow.
 */
function levelAtUpdate(state: BucketState): number {
  const { remaining, limit: capacity, refillPerSecond: rate, resetAt, updatedAt } = state;
  if (remaining > 0 || capacity === undefined || resetAt === undefined || rate === undefined || rate <= 0) {
    return remaining;
  }
  return Math.min(remaining, capacity - (rate * Math.max(0, resetAt - updatedAt)) / 1000);
}

/**
 * delayMs returns how long a call costing `cost` in a bucket should wait
 * before it is sent, at `at`, when calls already sent and not yet answered
 * will take `pending` tokens from it: 0 to send now (also when nothing is
 * known, or when the cost exceeds the bucket's capacity, which no wait
 * cures and the server will say so), Infinity when only the answers of the
 * pending calls can tell (they alone would overfill the bucket), else the
 * milliseconds until the estimate says the bucket can pay. It errs long, as
 * {@link estimateRemaining} errs low.
 */
export function delayMs(state: BucketState | undefined, cost: number, pending: number, at: number): number {
  if (state === undefined) {
    return 0;
  }
  const capacity = state.limit;
  if (capacity !== undefined && cost > capacity) {
    return 0;
  }
  const need = cost + pending;
  if (estimateRemaining(state, at) >= need) {
    return 0;
  }
  if (capacity !== undefined && need > capacity) {
    return Infinity;
  }
  let wait = Infinity;
  const rate = state.refillPerSecond;
  if (rate !== undefined && rate > 0) {
    // Forward from the observation at the slowest rate the policy allows.
    const level = levelAtUpdate(state);
    const at0 = state.updatedAt + ((need - level) / rate) * 1000;
    wait = Math.max(0, at0 - at);
  }
  if (capacity !== undefined && state.resetAt !== undefined) {
    wait = Math.min(wait, Math.max(0, state.resetAt - at)); // full by then
  }
  return wait === Infinity ? 0 : Math.ceil(wait);
}
