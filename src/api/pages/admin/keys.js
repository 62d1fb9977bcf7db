// Keys: search, filter by status, create (the key shown once), disable and
// enable, edit limits, top up (with an idempotency key), delete (after a
// confirmation). All through /api/v1/keys….

import { copyButton, el, field, fill, keyStatus, randomId, table, usd } from "../ui.js";

const PAGE = 1000;
// The admin API pages keys; a console lists at most this many.
const MAX_KEYS = 10000;

// A form's non-empty inputs as {name: string}; numbers stay strings (the
// API reads amounts exactly from strings) except integer limits.
const INTEGER = new Set(["max_requests", "rpm", "concurrency"]);
function values(form, names, { emptyIsNull = false } = {}) {
  const out = {};
  for (const n of names) {
    const v = form.elements[n].value.trim();
    if (v === "") {
      if (emptyIsNull) out[n] = null;
      continue;
    }
    out[n] = INTEGER.has(n) && /^\d+$/.test(v) ? Number(v) : v;
  }
  return out;
}

async function mount(root, ctx) {
  let all = [];
  const search = el("input", { id: "key-search", type: "search", placeholder: "name, owner or label" });
  const status = el("select", { id: "key-status" },
    ["all", "active", "disabled", "expired", "exhausted"].map((s) => el("option", { value: s }, s)));
  const list = el("div", { id: "key-list" }, "Loading…");
  const panel = el("div", { id: "key-panel", class: "panel", hidden: true });
  const created = el("div", { id: "created", class: "panel", hidden: true });

  const create = el("form", { id: "create-form", class: "inline", autocomplete: "off" },
    field("create-name", "Name", { name: "name", required: true, maxlength: 256 }),
    field("create-owner", "Owner", { name: "owner" }),
    field("create-limit", "Limit (USD)", { name: "limit", inputmode: "decimal" }),
    field("create-max-requests", "Max requests", { name: "max_requests", inputmode: "numeric" }),
    field("create-rpm", "Requests / min", { name: "rpm", inputmode: "numeric" }),
    el("button", { type: "submit" }, "Create key"));
  // The inputs are named after the API's fields.
  for (const [id, n] of [["create-name", "name"], ["create-owner", "owner"], ["create-limit", "limit"],
    ["create-max-requests", "max_requests"], ["create-rpm", "rpm"]]) create.querySelector(`#${id}`).name = n;

  root.append(
    el("details", { class: "create" }, el("summary", {}, "Create a key"), create),
    created,
    el("div", { class: "toolbar" },
      el("label", { for: "key-search" }, "Search"), search,
      el("label", { for: "key-status" }, "Status"), status,
      el("button", { type: "button", id: "key-refresh", on: { click: () => load().catch(report) } }, "Refresh")),
    list, panel);

  const report = (e) => ctx.say(e.message, "error");

  async function load() {
    const rows = [];
    for (let offset = 0; offset < MAX_KEYS; offset += PAGE) {
      const page = (await ctx.api(`/api/v1/keys?include_disabled=true&limit=${PAGE}&offset=${offset}`)).data;
      rows.push(...page);
      if (page.length < PAGE) break;
    }
    all = rows;
    draw();
  }

  function draw() {
    const q = search.value.trim().toLowerCase();
    const want = status.value;
    const shown = all.filter((k) => {
      const s = keyStatus(k);
      const hay = `${k.name}\n${k.owner || ""}\n${k.label}`.toLowerCase();
      return (want === "all" || s === want) && (!q || hay.includes(q));
    });
    fill(list, shown.length
      ? table(["Name", "Label", "Owner", "Status", "#Used (USD)", "#Limit (USD)", "#Requests", "Actions"],
        shown.map((k) => {
          const s = keyStatus(k);
          return {
            attrs: { "data-hash": k.hash },
            cells: [k.name, k.label, k.owner || "", el("span", { class: `status ${s}` }, s),
              k.usage, k.limit ?? "unlimited",
              k.max_requests != null ? `${k.requests} of ${k.max_requests}` : k.requests,
              actions(k)],
          };
        }), { id: "keys-table" })
      : el("p", {}, all.length ? "No key matches." : "No keys yet."));
  }

  function actions(k) {
    const b = (cls, text, f) => el("button", { type: "button", class: cls, on: { click: f } }, text);
    return el("div", { class: "actions" },
      k.disabled
        ? b("act-enable", "Enable", () => patch(k, { disabled: false }, "enabled"))
        : b("act-disable", "Disable", () => patch(k, { disabled: true }, "disabled")),
      b("act-edit", "Edit limits", () => edit(k)),
      b("act-topup", "Top up", () => topup(k)),
      b("act-delete", "Delete", () => remove(k)));
  }

  function open(title, ...children) {
    fill(panel, el("h3", {}, title), ...children,
      el("button", { type: "button", class: "secondary", on: { click: close } }, "Close"));
    panel.hidden = false;
    const first = panel.querySelector("input, button");
    if (first) first.focus();
  }
  function close() {
    panel.hidden = true;
    panel.replaceChildren();
  }

  async function patch(k, body, done) {
    try {
      await ctx.api(`/api/v1/keys/${k.hash}`, { method: "PATCH", body });
      ctx.say(`Key ${k.name} ${done}.`);
      await load();
    } catch (e) {
      report(e);
    }
  }

  function edit(k) {
    const form = el("form", { id: "edit-form", class: "inline", autocomplete: "off" },
      field("edit-limit", "Limit (USD, empty = unlimited)", { value: k.limit ?? "", inputmode: "decimal" }),
      field("edit-max-requests", "Max requests", { value: k.max_requests ?? "", inputmode: "numeric" }),
      field("edit-rpm", "Requests / min", { value: k.rpm ?? "", inputmode: "numeric" }),
      field("edit-concurrency", "Concurrent", { value: k.concurrency ?? "", inputmode: "numeric" }),
      el("button", { type: "submit" }, "Save"));
    for (const [id, n] of [["edit-limit", "limit"], ["edit-max-requests", "max_requests"], ["edit-rpm", "rpm"], ["edit-concurrency", "concurrency"]]) form.querySelector(`#${id}`).name = n;
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      await patch(k, values(form, ["limit", "max_requests", "rpm", "concurrency"], { emptyIsNull: true }), "updated");
      close();
    });
    open(`Limits of ${k.name}`, form);
  }

  function topup(k) {
    const form = el("form", { id: "topup-form", class: "inline", autocomplete: "off" },
      field("topup-amount", "Amount (USD)", { required: true, inputmode: "decimal" }),
      field("topup-reason", "Reason", { required: true, value: "admin console" }),
      field("topup-idempotency", "Idempotency key", { required: true, value: randomId() }),
      el("button", { type: "submit" }, "Top up"));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const body = {
        kind: "topup",
        amount: form.querySelector("#topup-amount").value.trim(),
        reason: form.querySelector("#topup-reason").value.trim(),
        idempotency_key: form.querySelector("#topup-idempotency").value.trim(),
      };
      try {
        await ctx.api(`/api/v1/keys/${k.hash}/credits`, { method: "POST", body });
        ctx.say(`Topped up ${k.name} by ${body.amount} USD.`);
        close();
        await load();
      } catch (e) {
        report(e);
      }
    });
    open(`Top up ${k.name}`, el("p", { class: "hint" },
      "Sending the same idempotency key again applies the top-up once."), form);
  }

  function remove(k) {
    const yes = el("button", { type: "button", id: "confirm-delete", class: "danger" }, "Delete for good");
    yes.addEventListener("click", async () => {
      try {
        await ctx.api(`/api/v1/keys/${k.hash}`, { method: "DELETE" });
        ctx.say(`Key ${k.name} deleted.`);
        close();
        await load();
      } catch (e) {
        report(e);
      }
    });
    open(`Delete ${k.name}?`, el("p", {}, `The key ${k.label} stops working at once. This cannot be undone.`), yes);
  }

  create.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const res = await ctx.api("/api/v1/keys", { method: "POST", body: values(create, ["name", "owner", "limit", "max_requests", "rpm"]) });
      const secret = res.key;
      fill(created,
        el("h3", {}, `Key created: ${res.data.name}`),
        el("p", {}, "Copy it now: it is shown once and cannot be read again."),
        el("div", { class: "snippet" }, el("code", { id: "created-key" }, secret), copyButton(secret)),
        el("p", {}, "Limit: ", usd(res.data.limit)),
        el("button", { type: "button", class: "secondary", on: { click: () => { created.hidden = true; created.replaceChildren(); } } }, "Done"));
      created.hidden = false;
      create.reset();
      await load();
    } catch (e) {
      report(e);
    }
  });
  search.addEventListener("input", draw);
  status.addEventListener("change", draw);
  await load();
}

export default { id: "keys", title: "Keys", mount };
