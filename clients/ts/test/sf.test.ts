import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { namedItems, parseRateLimitFields } from "../src/fields.js";
import { parseList, type Member } from "../src/sf.js";

// simplify renders members as plain data, for readable expectations.
function simplify(members: Member[] | undefined): unknown {
  if (members === undefined) {
    return undefined;
  }
  const params = (p: ReadonlyMap<string, { type: string; value: unknown }>) =>
    Object.fromEntries([...p].map(([k, v]) => [k, `${v.type}:${String(v.value)}`]));
  return members.map((m) =>
    m.kind === "item"
      ? { [`${m.value.type}:${String(m.value.value)}`]: params(m.params) }
      : { inner: m.items.map((i) => `${i.value.type}:${String(i.value.value)}`), params: params(m.params) },
  );
}

describe("parseList", () => {
  const valid: { name: string; input: string; want: unknown }[] = [
    { name: "one item", input: '"search";r=59;t=1', want: [{ "string:search": { r: "integer:59", t: "integer:1" } }] },
    {
      name: "two items",
      input: '"search";r=59;t=1, "all_ai_tokens";r=99;t=1',
      want: [
        { "string:search": { r: "integer:59", t: "integer:1" } },
        { "string:all_ai_tokens": { r: "integer:99", t: "integer:1" } },
      ],
    },
    {
      name: "spaces around members and commas",
      input: '   "a";r=1  ,   "b";r=2   ',
      want: [{ "string:a": { r: "integer:1" } }, { "string:b": { r: "integer:2" } }],
    },
    {
      name: "tabs around commas",
      input: '"a";r=1\t,\t"b";r=2',
      want: [{ "string:a": { r: "integer:1" } }, { "string:b": { r: "integer:2" } }],
    },
    { name: "no space after a comma", input: '"a","b"', want: [{ "string:a": {} }, { "string:b": {} }] },
    { name: "space after a semicolon", input: '"a"; r=1;  t=2', want: [{ "string:a": { r: "integer:1", t: "integer:2" } }] },
    { name: "token item", input: "search;r=1", want: [{ "token:search": { r: "integer:1" } }] },
    { name: "token with colon and slash", input: "a:b/c", want: [{ "token:a:b/c": {} }] },
    { name: "escaped quote and backslash", input: '"a\\"b\\\\c";r=1', want: [{ 'string:a"b\\c': { r: "integer:1" } }] },
    { name: "comma inside a string", input: '"a, b";r=1', want: [{ "string:a, b": { r: "integer:1" } }] },
    { name: "bare parameter is true", input: '"a";r=1;x', want: [{ "string:a": { r: "integer:1", x: "boolean:true" } }] },
    { name: "repeated parameter keeps the last", input: '"a";r=1;r=2', want: [{ "string:a": { r: "integer:2" } }] },
    { name: "decimal", input: '"a";r=1.5;s=-0.125', want: [{ "string:a": { r: "decimal:1.5", s: "decimal:-0.125" } }] },
    { name: "negative integer", input: '"a";r=-1', want: [{ "string:a": { r: "integer:-1" } }] },
    { name: "15-digit integer", input: '"a";r=999999999999999', want: [{ "string:a": { r: "integer:999999999999999" } }] },
    { name: "booleans and binary", input: '?1;a=?0, :aGk=:', want: [{ "boolean:true": { a: "boolean:false" } }, { "binary:aGk=": {} }] },
    { name: "key characters", input: '"a";*k_-.9=1', want: [{ "string:a": { "*k_-.9": "integer:1" } }] },
    {
      name: "inner list",
      input: '("a" "b");q=1, "c";r=2',
      want: [{ inner: ["string:a", "string:b"], params: { q: "integer:1" } }, { "string:c": { r: "integer:2" } }],
    },
    { name: "empty inner list", input: "()", want: [{ inner: [], params: {} }] },
  ];
  for (const tc of valid) {
    test(`valid: ${tc.name}`, () => {
      assert.deepEqual(simplify(parseList(tc.input)), tc.want);
    });
  }

  const malformed: { name: string; input: string }[] = [
    { name: "empty", input: "" },
    { name: "only spaces", input: "   " },
    { name: "leading tab", input: '\t"a"' },
    { name: "trailing comma", input: '"a";r=1,' },
    { name: "empty member", input: '"a",,"b"' },
    { name: "members without a comma", input: '"a" "b"' },
    { name: "unterminated string", input: '"a;r=1' },
    { name: "unknown escape", input: '"a\\n"' },
    { name: "control character in a string", input: '"a\u0001"' },
    { name: "non-ASCII string", input: '"é";r=1' },
    { name: "non-ASCII token", input: "é;r=1" },
    { name: "uppercase key", input: '"a";R=1' },
    { name: "key starting with a digit", input: '"a";1r=1' },
    { name: "space before a semicolon", input: '"a" ;r=1' },
    { name: "parameters without an item", input: ";r=1" },
    { name: "parameter without a value after =", input: '"a";r=' },
    { name: "16-digit integer", input: '"a";r=1234567890123456' },
    { name: "decimal with four places", input: '"a";r=1.2345' },
    { name: "decimal ending in a dot", input: '"a";r=1.' },
    { name: "decimal with 13 integer digits", input: '"a";r=1234567890123.5' },
    { name: "minus without digits", input: '"a";r=-' },
    { name: "bad boolean", input: "?2" },
    { name: "unterminated binary", input: ":aGk=" },
    { name: "unterminated inner list", input: '("a" "b"' },
    { name: "inner list items without a space", input: '("a""b")' },
    { name: "a JSON value", input: '{"search": 1}' },
    { name: "garbage after an item", input: '"a";r=1 x' },
  ];
  for (const tc of malformed) {
    test(`malformed: ${tc.name}`, () => {
      assert.equal(parseList(tc.input), undefined);
    });
  }
});

describe("namedItems", () => {
  const cases: { name: string; input: string | null; want: Record<string, Record<string, number>> }[] = [
    { name: "absent field", input: null, want: {} },
    { name: "malformed field is ignored whole", input: '"a";r=1, "b";r=', want: {} },
    { name: "required and optional", input: '"a";r=1;t=2, "b";r=3', want: { a: { r: 1, t: 2 }, b: { r: 3 } } },
    { name: "item without r is skipped", input: '"a";t=2, "b";r=3', want: { b: { r: 3 } } },
    { name: "decimal r is skipped", input: '"a";r=1.5, "b";r=3', want: { b: { r: 3 } } },
    { name: "negative r is skipped", input: '"a";r=-1, "b";r=3', want: { b: { r: 3 } } },
    { name: "string r is skipped", input: '"a";r="1", "b";r=3', want: { b: { r: 3 } } },
    { name: "bad optional t skips the item", input: '"a";r=1;t=?1, "b";r=3', want: { b: { r: 3 } } },
    { name: "unknown parameters are ignored", input: '"a";r=1;pk=:aGk=:;x', want: { a: { r: 1 } } },
    { name: "token names are accepted", input: "a;r=1", want: { a: { r: 1 } } },
    { name: "other item types are skipped", input: '1;r=1, ?1;r=2, ("a");r=3, "b";r=4', want: { b: { r: 4 } } },
    { name: "a repeated bucket keeps the last", input: '"a";r=1, "a";r=2', want: { a: { r: 2 } } },
  ];
  for (const tc of cases) {
    test(tc.name, () => {
      assert.deepEqual(Object.fromEntries(namedItems(tc.input, ["r"], ["t"])), tc.want);
    });
  }
});

test("parseRateLimitFields reads the three fields, each on its own", () => {
  const headers = new Headers();
  headers.set("RateLimit", '"search";r=59;t=1, "all_ai_tokens";r=99;t=1');
  headers.append("RateLimit", '"extra";r=5');
  headers.set("RateLimit-Policy", '"search";q=60;w=60, "all_ai_tokens";q=100;w=86400');
  headers.set("Connectlimit-Warning", '"all_ai_tokens";r=99'); // no q: skipped
  const got = parseRateLimitFields(headers);
  assert.deepEqual(Object.fromEntries(got.rateLimit), {
    search: { remaining: 59, resetSeconds: 1 },
    all_ai_tokens: { remaining: 99, resetSeconds: 1 },
    extra: { remaining: 5, resetSeconds: undefined },
  });
  assert.deepEqual(Object.fromEntries(got.policy), {
    search: { quota: 60, windowSeconds: 60 },
    all_ai_tokens: { quota: 100, windowSeconds: 86400 },
  });
  assert.equal(got.warning.size, 0);

  headers.set("RateLimit-Policy", "not a list;");
  headers.set("Connectlimit-Warning", '"all_ai_tokens";r=9;q=100');
  const again = parseRateLimitFields(headers);
  assert.equal(again.rateLimit.size, 3);
  assert.equal(again.policy.size, 0);
  assert.deepEqual(Object.fromEntries(again.warning), { all_ai_tokens: { remaining: 9, quota: 100 } });
});
