// What both pages share: building DOM nodes (text only, never HTML),
// calling the API with a bearer credential, and small widgets.

import { isZero, parseExact } from "./exact.js";

// el("td", {class: "num"}, "0.5", otherNode): children that are strings
// become text nodes, so nothing the API returns is ever parsed as HTML.
export function el(tag, attrs = {}, ...children) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === "on") for (const [ev, f] of Object.entries(v)) n.addEventListener(ev, f);
    else n.setAttribute(k, v === true ? "" : String(v));
  }
  append(n, children);
  return n;
}

function append(n, children) {
  for (const c of children.flat(Infinity)) {
    if (c == null || c === false) continue;
    n.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

// Replaces a node's children.
export function fill(n, ...children) {
  n.replaceChildren();
  append(n, children);
  return n;
}

// An API error, with the API's own message.
export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// Calls the API; answers the parsed body (numbers as exact strings) or
// throws an ApiError carrying the API's message.
export async function api(path, credential, { method = "GET", body } = {}) {
  const headers = { authorization: `Bearer ${credential}` };
  if (body !== undefined) headers["content-type"] = "application/json";
  let res;
  try {
    res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
    });
  } catch (e) {
    throw new ApiError(0, `The gateway could not be reached (${e.message}).`, "network");
  }
  const text = await res.text();
  let data = null;
  try {
    data = text ? parseExact(text) : null;
  } catch {
    data = null;
  }
  if (!res.ok || (data && data.code === false)) {
    const err = data && data.error;
    const message = (err && err.message) || (data && data.message) || `HTTP ${res.status}`;
    throw new ApiError(res.status, message, err && err.code);
  }
  return data;
}

// A credential kept for this tab only (sessionStorage: gone when the tab
// closes, never shared with other tabs, never sent anywhere by itself).
export const session = {
  get: (name) => sessionStorage.getItem(name),
  set: (name, v) => sessionStorage.setItem(name, v),
  clear: (name) => sessionStorage.removeItem(name),
};

// A button that copies `text()` to the clipboard and says so.
export function copyButton(text, label = "Copy") {
  const b = el("button", { type: "button", class: "copy" }, label);
  b.addEventListener("click", async () => {
    const value = typeof text === "function" ? text() : text;
    try {
      await navigator.clipboard.writeText(value);
      b.textContent = "Copied";
    } catch {
      b.textContent = "Select and copy";
    }
    setTimeout(() => (b.textContent = label), 1500);
  });
  return b;
}

// A definition list of [term, value] pairs; a value may be a node.
export function facts(pairs) {
  return el("dl", { class: "facts" }, pairs.map(([k, v, id]) => [
    el("dt", {}, k),
    el("dd", id ? { id } : {}, v),
  ]));
}

// A table from column headers and rows of cells (strings or nodes); a
// column whose header starts with "#" is numeric (right-aligned).
export function table(headers, rows, attrs = {}) {
  const num = headers.map((h) => h.startsWith("#"));
  return el("div", { class: "scroll" }, el("table", attrs,
    el("thead", {}, el("tr", {}, headers.map((h, i) => el("th", { scope: "col", class: num[i] ? "num" : null }, h.replace(/^#/, ""))))),
    el("tbody", {}, rows.map((r) => el("tr", r.attrs || {}, (r.cells || r).map((c, i) => el("td", { class: num[i] ? "num" : null }, c)))))));
}

// "12.5 USD" from the API's decimal string, unchanged.
export function usd(dec) {
  return dec == null ? "unlimited" : `${dec} USD`;
}

// The key's state in one word, from exact comparisons only.
export function keyStatus(k, nowMs = Date.now()) {
  if (k.disabled) return "disabled";
  if (k.expires_at && Date.parse(k.expires_at) <= nowMs) return "expired";
  if (k.limit != null && k.limit_remaining != null && isZero(k.limit_remaining)) return "exhausted";
  if (k.max_requests != null && BigInt(k.requests) >= BigInt(k.max_requests)) return "exhausted";
  return "active";
}

// Shows a message in a live region (errors use role=alert).
export function say(node, message, kind = "info") {
  fill(node, message || "");
  node.className = `notice ${message ? kind : ""}`;
}

// A fresh idempotency key for a money-moving form: the user may send the
// same form twice (a double click, a retry) and the API applies it once.
export function randomId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

// A labelled input; `attrs.name` names the API field it carries.
export function field(id, label, attrs = {}) {
  return el("div", { class: "field" },
    el("label", { for: id }, label),
    el("input", { id, name: id, ...attrs }));
}

// A small button that calls `f` on click.
export function button(cls, text, f) {
  return el("button", { type: "button", class: cls, on: { click: f } }, text);
}

// The outbox and the audit log page oldest first by `after`, LOG_PAGE
// items at a time (the API's largest page).
export const LOG_PAGE = 1000;
// How many items of such a log a list shows, and how many pages it reads
// at most to find the newest.
const LOG_SHOWN = 200;
const LOG_MAX_PAGES = 20;

// The newest LOG_SHOWN items of an oldest-first log, newest first:
// `call(path)` is the API, `url(after)` a page's address (asking for
// LOG_PAGE items), `seq(item)` an item's position.
export async function newest(call, url, seq) {
  let after = "0";
  let kept = [];
  for (let i = 0; i < LOG_MAX_PAGES; i++) {
    const page = (await call(url(after))).data;
    kept = kept.concat(page).slice(-LOG_SHOWN);
    if (page.length < LOG_PAGE) break;
    after = String(seq(page[page.length - 1]));
  }
  return kept.reverse();
}

// Offset paging over a list endpoint that takes `offset` and `limit`
// (keys, accounts, payments, webhook deliveries): `load(offset, limit)`
// fills the list and answers how many rows it got; the returned pager
// holds Previous / Next buttons (Next only while a page came back full)
// and `reset()`, for a changed filter, goes back to the first page.
export const LIST_PAGE = 100;
export function pager(id, load) {
  let offset = 0;
  const info = el("span", { class: "hint", id: `${id}-page` });
  const prev = button("secondary", "Previous", () => go(Math.max(0, offset - LIST_PAGE)));
  const next = button("secondary", "Next", () => go(offset + LIST_PAGE));
  prev.id = `${id}-prev`;
  next.id = `${id}-next`;
  async function go(to) {
    const got = await load(to, LIST_PAGE);
    offset = to;
    prev.disabled = offset === 0;
    next.disabled = got < LIST_PAGE;
    info.textContent = got ? `${offset + 1}–${offset + got}` : "";
  }
  return {
    node: el("div", { class: "toolbar pager" }, prev, info, next),
    reset: () => go(0),
    reload: () => go(offset),
  };
}
