import type { LimitDescription } from "@connectlimit/client";
import { formatClock, formatDuration } from "./dom.js";

/**
 * Countdown shows a denial and counts down to the retry time. Its box holds
 * a message (in an aria-live region: announced when the limit starts and
 * ends) and a role="timer" element (not announced: it changes five times a
 * second). The box's data attributes expose the state to tests: data-state
 * ("waiting", "ready"), data-bucket, data-retry-after-ms and data-retry-at
 * (ms since the epoch).
 */
export class Countdown {
  private until = 0;
  private timer: ReturnType<typeof setInterval> | undefined;
  private readonly message: HTMLElement;
  private readonly clock: HTMLElement;
  private readonly clockLine: HTMLElement;

  constructor(
    private readonly box: HTMLElement,
    private readonly action: string,
    private readonly onChange: () => void,
  ) {
    this.message = box.querySelector(".limit-message") ?? box;
    this.clock = box.querySelector("[role=timer]") ?? box;
    this.clockLine = box.querySelector(".limit-timer") ?? this.clock;
  }

  /** active tells whether the wait is still running. */
  active(): boolean {
    return this.timer !== undefined;
  }

  /** start shows limit and counts down retryAfterMs from now. */
  start(limit: LimitDescription, retryAfterMs: number): void {
    this.stop();
    this.until = Date.now() + retryAfterMs;
    const who = limit.subject !== undefined ? ` for ${limit.subject}` : "";
    const bucket = limit.bucket !== undefined ? `bucket “${limit.bucket}”` : "a limit";
    this.box.hidden = false;
    this.box.dataset["state"] = "waiting";
    this.box.dataset["bucket"] = limit.bucket ?? "";
    this.box.dataset["retryAfterMs"] = String(retryAfterMs);
    this.box.dataset["retryAt"] = String(this.until);
    this.message.textContent =
      `Rate limited by ${bucket}${who}. ${this.action} is available again at ${formatClock(this.until)}.`;
    this.clockLine.hidden = false;
    this.timer = setInterval(() => this.tick(), 200);
    this.tick();
  }

  /** cancel stops counting and hides the box, as when the caller changes. */
  cancel(): void {
    this.stop();
    this.hide();
  }

  /** hide hides a countdown that has ended. */
  hide(): void {
    if (!this.active()) {
      this.box.hidden = true;
    }
  }

  private tick(): void {
    const left = this.until - Date.now();
    if (left > 0) {
      this.clock.textContent = formatDuration(left);
      return;
    }
    this.stop();
    this.box.dataset["state"] = "ready";
    this.clockLine.hidden = true;
    this.message.textContent = `${this.action} is available again.`;
    this.onChange();
  }

  private stop(): void {
    if (this.timer !== undefined) {
      clearInterval(this.timer);
      this.timer = undefined;
    }
  }
}
