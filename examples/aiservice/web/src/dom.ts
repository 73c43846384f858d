// Small DOM helpers.

/** byId returns the element with the given id, which the page must have. */
export function byId<T extends HTMLElement = HTMLElement>(id: string): T {
  const el = document.getElementById(id);
  if (el === null) {
    throw new Error(`the page has no #${id}`);
  }
  return el as T;
}

/**
 * setDisabled marks a button unavailable with aria-disabled rather than
 * disabled, so that it keeps keyboard focus (a disabled button drops it) and
 * screen readers still find it; click handlers check it.
 */
export function setDisabled(button: HTMLButtonElement, disabled: boolean): void {
  if (disabled) {
    button.setAttribute("aria-disabled", "true");
  } else {
    button.removeAttribute("aria-disabled");
  }
}

const tokensFormat = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });

/** formatTokens formats a whole number of tokens, as "10,000". */
export function formatTokens(n: number): string {
  return tokensFormat.format(n);
}

/** formatDuration formats a wait of ms milliseconds, as "1.8 s", "42 s" or "3 min 5 s". */
export function formatDuration(ms: number): string {
  const s = Math.max(0, ms) / 1000;
  if (s < 10) {
    return `${(Math.ceil(s * 10) / 10).toFixed(1)} s`;
  }
  const whole = Math.ceil(s);
  if (whole < 120) {
    return `${whole} s`;
  }
  const h = Math.floor(whole / 3600);
  const m = Math.floor((whole % 3600) / 60);
  if (h > 0) {
    return m > 0 ? `${h} h ${m} min` : `${h} h`;
  }
  const rest = whole % 60;
  return rest > 0 ? `${m} min ${rest} s` : `${m} min`;
}

/**
 * formatRate formats a refill rate given in tokens a second, in the first of
 * second, minute, hour and day that makes it a whole number ("10,000/h"
 * rather than "2.78/s"), else in the first that makes it at least 1.
 */
export function formatRate(perSecond: number): string {
  const units: [string, number][] = [
    ["s", 1],
    ["min", 60],
    ["h", 3600],
    ["day", 86400],
  ];
  const whole = units.find(([, n]) => {
    const v = perSecond * n;
    return v >= 1 && Math.abs(v - Math.round(v)) < 1e-6 * v;
  });
  const [unit, n] = whole ?? units.find(([, n]) => perSecond * n >= 1) ?? units[units.length - 1]!;
  return `${new Intl.NumberFormat("en-US", { maximumFractionDigits: 2 }).format(perSecond * n)}/${unit}`;
}

/** formatClock formats an instant (ms since the epoch) as a local time of day. */
export function formatClock(at: number): string {
  return new Date(at).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}
