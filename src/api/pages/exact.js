// JSON with exact numbers: the API writes amounts as exact decimals
// (0.000000000001 is one picoUSD), which JSON.parse would turn into
// binary floats and print back as 1e-12 or with a rounding error. This
// parser keeps every number as its text, so what the page shows is the
// API's text, character for character. Use Number(x) only for geometry
// (a bar's height), never for a number a person reads.

export function parseExact(text) {
  let i = 0;
  const fail = (what) => {
    throw new SyntaxError(`bad JSON at ${i}: ${what}`);
  };
  const ws = () => {
    while (i < text.length && " \t\n\r".includes(text[i])) i++;
  };
  const value = () => {
    ws();
    const c = text[i];
    if (c === "{") return object();
    if (c === "[") return array();
    if (c === '"') return string();
    if (c === "t" && text.startsWith("true", i)) { i += 4; return true; }
    if (c === "f" && text.startsWith("false", i)) { i += 5; return false; }
    if (c === "n" && text.startsWith("null", i)) { i += 4; return null; }
    return number();
  };
  const object = () => {
    i++;
    const out = {};
    ws();
    if (text[i] === "}") { i++; return out; }
    for (;;) {
      ws();
      if (text[i] !== '"') fail("expected a key");
      const k = string();
      ws();
      if (text[i] !== ":") fail("expected :");
      i++;
      // Own data properties only: a key named __proto__ stays a plain key.
      Object.defineProperty(out, k, { value: value(), enumerable: true, writable: true, configurable: true });
      ws();
      if (text[i] === ",") { i++; continue; }
      if (text[i] === "}") { i++; return out; }
      fail("expected , or }");
    }
  };
  const array = () => {
    i++;
    const out = [];
    ws();
    if (text[i] === "]") { i++; return out; }
    for (;;) {
      out.push(value());
      ws();
      if (text[i] === ",") { i++; continue; }
      if (text[i] === "]") { i++; return out; }
      fail("expected , or ]");
    }
  };
  const string = () => {
    // Find the closing quote (skipping escapes) and let JSON.parse decode
    // the escapes: it is exact for strings.
    const start = i;
    i++;
    while (i < text.length && text[i] !== '"') i += text[i] === "\\" ? 2 : 1;
    if (i >= text.length) fail("unterminated string");
    i++;
    return JSON.parse(text.slice(start, i));
  };
  const number = () => {
    const m = /^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?/.exec(text.slice(i, i + 64));
    if (!m) fail("unexpected character");
    i += m[0].length;
    return m[0];
  };
  const v = value();
  ws();
  if (i !== text.length) fail("trailing characters");
  return v;
}

// Exact comparisons of the API's decimal strings, for the few decisions
// the page makes from them (is the remaining amount zero?).
export function isZero(dec) {
  return dec != null && /^-?0(\.0+)?$/.test(String(dec));
}

// Integers as BigInt, so that request counts compare exactly.
export function int(x) {
  return x == null ? null : BigInt(String(x));
}
