// A strict parser for RFC 8941 Structured Field Lists, the syntax of the
// RateLimit and RateLimit-Policy fields. As the RFC requires, any syntax error
// fails the whole field: the caller then ignores it rather than act on half of
// it. Only what a List needs is here (no Dictionaries).

/** A bare item of a structured field, tagged with its type. */
export type BareItem =
  | { readonly type: "integer"; readonly value: number }
  | { readonly type: "decimal"; readonly value: number }
  | { readonly type: "string"; readonly value: string }
  | { readonly type: "token"; readonly value: string }
  | { readonly type: "binary"; readonly value: string } // base64, undecoded
  | { readonly type: "boolean"; readonly value: boolean };

/** Parameters of an item, in order; a repeated key keeps its last value. */
export type Params = ReadonlyMap<string, BareItem>;

/** An Item: a bare item with parameters. */
export interface Item {
  readonly kind: "item";
  readonly value: BareItem;
  readonly params: Params;
}

/** An Inner List: items in parentheses, with parameters of its own. */
export interface InnerList {
  readonly kind: "innerList";
  readonly items: readonly Item[];
  readonly params: Params;
}

/** A List member. */
export type Member = Item | InnerList;

class SyntaxFailure extends Error {}

/**
 * parseList parses a field value as an RFC 8941 List. It returns undefined
 * when the value is not a valid List (the RFC's "fail parsing"), including
 * for an empty string, since these fields are never sent empty.
 */
export function parseList(input: string): Member[] | undefined {
  try {
    return new ListParser(input).parse();
  } catch (e) {
    if (e instanceof SyntaxFailure) {
      return undefined;
    }
    throw e;
  }
}

const maxInteger = 999_999_999_999_999;

function isDigit(c: string | undefined): boolean {
  return c !== undefined && c >= "0" && c <= "9";
}

function isLcAlpha(c: string | undefined): boolean {
  return c !== undefined && c >= "a" && c <= "z";
}

function isAlpha(c: string | undefined): boolean {
  return isLcAlpha(c) || (c !== undefined && c >= "A" && c <= "Z");
}

// tchar of RFC 9110, section 5.6.2.
function isTchar(c: string | undefined): boolean {
  return c !== undefined && (isAlpha(c) || isDigit(c) || "!#$%&'*+-.^_`|~".includes(c));
}

class ListParser {
  private pos = 0;

  constructor(private readonly s: string) {}

  parse(): Member[] {
    this.skipSP();
    const members: Member[] = [];
    while (!this.done()) {
      members.push(this.peek() === "(" ? this.innerList() : this.item());
      this.skipOWS();
      if (this.done()) {
        break;
      }
      this.expect(",");
      this.skipOWS();
      if (this.done()) {
        this.fail(); // a trailing comma
      }
    }
    if (members.length === 0) {
      this.fail();
    }
    return members;
  }

  private item(): Item {
    const value = this.bareItem();
    return { kind: "item", value, params: this.params() };
  }

  private innerList(): InnerList {
    this.expect("(");
    const items: Item[] = [];
    for (;;) {
      this.skipSP();
      if (this.peek() === ")") {
        this.pos++;
        return { kind: "innerList", items, params: this.params() };
      }
      items.push(this.item());
      const c = this.peek();
      if (c !== " " && c !== ")") {
        this.fail();
      }
    }
  }

  private params(): Params {
    const params = new Map<string, BareItem>();
    while (this.peek() === ";") {
      this.pos++;
      this.skipSP();
      const key = this.key();
      let value: BareItem = { type: "boolean", value: true };
      if (this.peek() === "=") {
        this.pos++;
        value = this.bareItem();
      }
      params.set(key, value);
    }
    return params;
  }

  private key(): string {
    const start = this.pos;
    const first = this.peek();
    if (!isLcAlpha(first) && first !== "*") {
      this.fail();
    }
    this.pos++;
    for (;;) {
      const c = this.peek();
      if (!(isLcAlpha(c) || isDigit(c) || c === "_" || c === "-" || c === "." || c === "*")) {
        break;
      }
      this.pos++;
    }
    return this.s.slice(start, this.pos);
  }

  private bareItem(): BareItem {
    const c = this.peek();
    if (c === "-" || isDigit(c)) {
      return this.number();
    }
    if (c === '"') {
      return this.string();
    }
    if (c === "*" || isAlpha(c)) {
      return this.token();
    }
    if (c === ":") {
      return this.binary();
    }
    if (c === "?") {
      return this.boolean();
    }
    return this.fail();
  }

  private number(): BareItem {
    let sign = 1;
    if (this.peek() === "-") {
      sign = -1;
      this.pos++;
    }
    if (!isDigit(this.peek())) {
      this.fail();
    }
    const digitsStart = this.pos;
    let dot = -1;
    while (!this.done()) {
      const c = this.peek();
      if (isDigit(c)) {
        this.pos++;
      } else if (c === "." && dot < 0) {
        if (this.pos - digitsStart > 12) {
          this.fail();
        }
        dot = this.pos;
        this.pos++;
      } else {
        break;
      }
      const length = this.pos - digitsStart;
      if ((dot < 0 && length > 15) || (dot >= 0 && length > 16)) {
        this.fail();
      }
    }
    const text = this.s.slice(digitsStart, this.pos);
    if (dot < 0) {
      const value = sign * Number(text);
      if (Math.abs(value) > maxInteger) {
        this.fail();
      }
      return { type: "integer", value };
    }
    const fraction = this.pos - dot - 1;
    if (fraction < 1 || fraction > 3) {
      this.fail(); // "1." or more than three decimal places
    }
    return { type: "decimal", value: sign * Number(text) };
  }

  private string(): BareItem {
    this.expect('"');
    let out = "";
    for (;;) {
      if (this.done()) {
        this.fail(); // unterminated
      }
      const c = this.s[this.pos++] as string;
      if (c === "\\") {
        const next = this.s[this.pos++];
        if (next !== '"' && next !== "\\") {
          this.fail();
        }
        out += next;
      } else if (c === '"') {
        return { type: "string", value: out };
      } else {
        const code = c.charCodeAt(0);
        if (code < 0x20 || code > 0x7e) {
          this.fail();
        }
        out += c;
      }
    }
  }

  private token(): BareItem {
    const start = this.pos;
    this.pos++; // ALPHA or "*", checked by the caller
    for (;;) {
      const c = this.peek();
      if (!(isTchar(c) || c === ":" || c === "/")) {
        break;
      }
      this.pos++;
    }
    return { type: "token", value: this.s.slice(start, this.pos) };
  }

  private binary(): BareItem {
    this.expect(":");
    const start = this.pos;
    for (;;) {
      const c = this.peek();
      if (c === ":") {
        break;
      }
      if (c === undefined || !(isAlpha(c) || isDigit(c) || c === "+" || c === "/" || c === "=")) {
        this.fail();
      }
      this.pos++;
    }
    const value = this.s.slice(start, this.pos);
    this.pos++;
    return { type: "binary", value };
  }

  private boolean(): BareItem {
    this.expect("?");
    const c = this.s[this.pos++];
    if (c === "1") {
      return { type: "boolean", value: true };
    }
    if (c === "0") {
      return { type: "boolean", value: false };
    }
    return this.fail();
  }

  private peek(): string | undefined {
    return this.s[this.pos];
  }

  private done(): boolean {
    return this.pos >= this.s.length;
  }

  private expect(c: string): void {
    if (this.s[this.pos] !== c) {
      this.fail();
    }
    this.pos++;
  }

  private skipSP(): void {
    while (this.s[this.pos] === " ") {
      this.pos++;
    }
  }

  private skipOWS(): void {
    while (this.s[this.pos] === " " || this.s[this.pos] === "\t") {
      this.pos++;
    }
  }

  private fail(): never {
    throw new SyntaxFailure();
  }
}
