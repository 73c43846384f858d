// The RateLimit, RateLimit-Policy and Connectlimit-Warning fields, read into
// per-bucket numbers.

import { headerRateLimit, headerRateLimitPolicy, headerWarning } from "./headers.js";
import { parseList } from "./sf.js";

/** One item of a RateLimit field: a bucket's state after a call. */
export interface RateLimitItem {
  /** r: whole tokens remaining. */
  readonly remaining: number;
  /** t: seconds until the bucket is full again, when sent. */
  readonly resetSeconds: number | undefined;
}

/** One item of a RateLimit-Policy field: a bucket's limit. */
export interface PolicyItem {
  /** q: the capacity, in tokens. */
  readonly quota: number;
  /** w: seconds to refill from empty, when sent. */
  readonly windowSeconds: number | undefined;
}

/** One item of a Connectlimit-Warning field: a bucket running low. */
export interface WarningItem {
  /** r: whole tokens remaining. */
  readonly remaining: number;
  /** q: the capacity, in tokens. */
  readonly quota: number;
}

/** The three fields of one response, by bucket name. */
export interface RateLimitFields {
  readonly rateLimit: ReadonlyMap<string, RateLimitItem>;
  readonly policy: ReadonlyMap<string, PolicyItem>;
  readonly warning: ReadonlyMap<string, WarningItem>;
}

/**
 * namedItems parses a List whose items name a bucket (a String, or a Token)
 * and carry non-negative Integer parameters. A field that is not a valid
 * List yields no items; an item without every required parameter, or with
 * one of another type, is skipped; parameters not asked for are ignored.
 * When a bucket appears twice, the last item wins.
 */
export function namedItems<K extends string>(
  value: string | null,
  required: readonly K[],
  optional: readonly K[] = [],
): Map<string, Partial<Record<K, number>>> {
  const out = new Map<string, Partial<Record<K, number>>>();
  if (value === null) {
    return out;
  }
  const members = parseList(value);
  if (members === undefined) {
    return out;
  }
  members: for (const m of members) {
    if (m.kind !== "item" || (m.value.type !== "string" && m.value.type !== "token")) {
      continue;
    }
    const numbers: Partial<Record<K, number>> = {};
    for (const key of [...required, ...optional]) {
      const p = m.params.get(key);
      if (p === undefined) {
        if (required.includes(key)) {
          continue members;
        }
        continue;
      }
      if (p.type !== "integer" || p.value < 0) {
        continue members;
      }
      numbers[key] = p.value;
    }
    out.set(m.value.value, numbers);
  }
  return out;
}

/**
 * parseRateLimitFields reads the RateLimit, RateLimit-Policy and
 * Connectlimit-Warning fields of headers. Absent or malformed fields read as
 * empty.
 */
export function parseRateLimitFields(headers: Headers): RateLimitFields {
  const rateLimit = new Map<string, RateLimitItem>();
  for (const [name, v] of namedItems(headers.get(headerRateLimit), ["r"], ["t"])) {
    rateLimit.set(name, { remaining: v.r ?? 0, resetSeconds: v.t });
  }
  const policy = new Map<string, PolicyItem>();
  for (const [name, v] of namedItems(headers.get(headerRateLimitPolicy), ["q"], ["w"])) {
    policy.set(name, { quota: v.q ?? 0, windowSeconds: v.w });
  }
  const warning = new Map<string, WarningItem>();
  for (const [name, v] of namedItems(headers.get(headerWarning), ["r", "q"])) {
    warning.set(name, { remaining: v.r ?? 0, quota: v.q ?? 0 });
  }
  return { rateLimit, policy, warning };
}
