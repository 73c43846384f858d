import { estimateRemaining, type BucketState } from "@connectlimit/client";
import { formatDuration, formatRate, formatTokens } from "./dom.js";

/** lowFraction is the share of its capacity under which a bucket shows as low (the server warns under 10%). */
const lowFraction = 0.1;

/**
 * renderBudgets draws one bar per bucket into list, updating the items it
 * drew before. A bar shows the estimate now (the last observed level plus
 * the refill since); the item's data-remaining is the level last observed,
 * from GetQuota (exact) or a response's RateLimit header (whole tokens).
 */
export function renderBudgets(list: HTMLUListElement, buckets: readonly BucketState[], at = Date.now()): void {
  const items = new Map<string, HTMLLIElement>();
  for (const li of list.querySelectorAll<HTMLLIElement>(":scope > li")) {
    items.set(li.dataset["bucket"] ?? "", li);
  }
  const ordered: HTMLLIElement[] = [];
  for (const b of buckets) {
    const li = items.get(b.bucket) ?? newItem(b.bucket, list.children.length + ordered.length);
    update(li, b, at);
    ordered.push(li);
  }
  // Same order as the state (by name); appending moves an existing item.
  // Skip the DOM work when nothing moved, so focus and selection stay put.
  const current = [...list.children];
  if (current.length !== ordered.length || ordered.some((li, i) => current[i] !== li)) {
    list.replaceChildren(...ordered);
  }
}

function newItem(bucket: string, n: number): HTMLLIElement {
  const li = document.createElement("li");
  li.dataset["bucket"] = bucket;
  const id = `bucket-${n}-${bucket.replace(/[^A-Za-z0-9_-]/g, "_")}`;
  li.innerHTML = `<div class="budget-head"><span class="bucket-name"></span><span class="budget-value"></span></div>
<meter min="0"></meter>
<div class="budget-detail"></div>`;
  const name = li.querySelector<HTMLElement>(".bucket-name")!;
  name.id = id;
  name.textContent = bucket;
  const meter = li.querySelector("meter")!;
  meter.setAttribute("aria-labelledby", id);
  return li;
}

function update(li: HTMLLIElement, b: BucketState, at: number): void {
  const value = li.querySelector<HTMLElement>(".budget-value")!;
  const meter = li.querySelector("meter")!;
  const detail = li.querySelector<HTMLElement>(".budget-detail")!;
  const now = estimateRemaining(b, at);
  // The kit's estimate errs low, and below zero after a RateLimit of r=0
  // (which says only "less than one token"); only GetQuota knows a debt.
  const shown = Math.max(Math.floor(now), Math.min(0, Math.floor(b.remaining)));
  li.dataset["remaining"] = String(b.remaining);
  li.dataset["updatedAt"] = String(b.updatedAt);
  if (b.limit !== undefined) {
    li.dataset["limit"] = String(b.limit);
  }
  const low = b.warning !== undefined || (b.limit !== undefined && now < b.limit * lowFraction);
  li.classList.toggle("low", low);
  value.textContent =
    (shown < 0 ? `in debt: ${formatTokens(shown)}` : formatTokens(shown)) +
    (b.limit !== undefined ? ` / ${formatTokens(b.limit)}` : "") +
    (low ? " (low)" : "");
  if (b.limit !== undefined && b.limit > 0) {
    meter.max = b.limit;
    meter.low = b.limit * lowFraction;
    meter.high = b.limit * 0.5;
    meter.optimum = b.limit;
  }
  meter.value = Math.max(0, now);
  meter.setAttribute("aria-valuetext", `${formatTokens(Math.max(0, shown))} tokens left${b.limit !== undefined ? ` of ${formatTokens(b.limit)}` : ""}`);
  const parts: string[] = [];
  if (b.refillPerSecond !== undefined && b.refillPerSecond > 0) {
    parts.push(`refills ${formatRate(b.refillPerSecond)}`);
    if (b.limit !== undefined) {
      parts.push(now >= b.limit ? "full" : `full in ${formatDuration(((b.limit - now) / b.refillPerSecond) * 1000)}`);
    }
  }
  detail.textContent = parts.join(" · ");
}
