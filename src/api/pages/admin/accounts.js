// Accounts (wallets): list with balance, allowance, subscription and keys;
// create; top up (with an idempotency key); the account's keys; its
// subscriptions (subscribe, renew, cancel). All through /api/v1/accounts…
// and /api/v1/subscriptions….

import { button, el, field, fill, keyStatus, randomId, table } from "../ui.js";

const PAGE = 1000;
// The admin API pages accounts; a console lists at most this many.
const MAX_ACCOUNTS = 10000;

async function mount(root, ctx) {
  let all = [];
  const list = el("div", { id: "account-list" }, "Loading…");
  const panel = el("div", { id: "account-panel", class: "panel", hidden: true });
  const search = el("input", { id: "account-search", type: "search", placeholder: "id, email or name" });
  const create = el("form", { id: "account-create-form", class: "inline", autocomplete: "off" },
    field("account-create-id", "Id", { name: "id", required: true, maxlength: 128 }),
    field("account-create-email", "Email", { name: "email", type: "email" }),
    field("account-create-name", "Name", { name: "name" }),
    el("button", { type: "submit" }, "Create account"));
  const report = (e) => ctx.say(e.message, "error");

  root.append(
    el("details", { class: "create" }, el("summary", {}, "Create an account"), create),
    el("div", { class: "toolbar" },
      el("label", { for: "account-search" }, "Search"), search,
      button("secondary", "Refresh", () => load().catch(report))),
    list, panel);

  async function load() {
    const rows = [];
    for (let offset = 0; offset < MAX_ACCOUNTS; offset += PAGE) {
      const page = (await ctx.api(`/api/v1/accounts?limit=${PAGE}&offset=${offset}`)).data;
      rows.push(...page);
      if (page.length < PAGE) break;
    }
    all = rows;
    draw();
  }

  function draw() {
    const q = search.value.trim().toLowerCase();
    const shown = all.filter((a) => !q || `${a.id}\n${a.email || ""}\n${a.name || ""}`.toLowerCase().includes(q));
    fill(list, shown.length
      ? table(["Id", "Email", "Status", "#Balance (USD)", "#Allowance (USD)", "#Reserved (USD)", "#Spent (USD)", "Subscription", "#Keys", "Actions"],
        shown.map((a) => ({
          attrs: { "data-account": a.id },
          cells: [a.id, a.email || "", a.status, a.unlimited ? `${a.balance} (unlimited)` : a.balance,
            a.allowance, a.reserved, a.spent.total,
            a.subscription ? `${a.subscription.plan} (${a.subscription.status})` : "none",
            a.keys,
            el("div", { class: "actions" },
              button("act-account-topup", "Top up", () => topup(a)),
              button("act-account-keys", "Keys", () => keys(a).catch(report)),
              button("act-account-subs", "Subscriptions", () => subscriptions(a).catch(report)))],
        })), { id: "accounts-table" })
      : el("p", {}, all.length ? "No account matches." : "No accounts yet."));
  }

  function open(title, ...children) {
    fill(panel, el("h3", {}, title), ...children,
      button("secondary", "Close", close));
    panel.hidden = false;
    const first = panel.querySelector("input, button");
    if (first) first.focus();
  }
  function close() {
    panel.hidden = true;
    panel.replaceChildren();
  }

  function topup(a) {
    const form = el("form", { id: "account-topup-form", class: "inline", autocomplete: "off" },
      field("account-topup-amount", "Amount (USD)", { required: true, inputmode: "decimal" }),
      field("account-topup-reason", "Reason", { required: true, value: "admin console" }),
      field("account-topup-idempotency", "Idempotency key", { required: true, value: randomId() }),
      el("button", { type: "submit" }, "Top up"));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const body = {
        kind: "topup",
        amount: form.elements["account-topup-amount"].value.trim(),
        reason: form.elements["account-topup-reason"].value.trim(),
        idempotency_key: form.elements["account-topup-idempotency"].value.trim(),
      };
      try {
        const res = await ctx.api(`/api/v1/accounts/${encodeURIComponent(a.id)}/credits`, { method: "POST", body });
        ctx.say(`Topped up account ${a.id} by ${body.amount} USD: balance ${res.data.account.balance} USD${res.data.replayed ? " (already applied)" : ""}.`);
        close();
        await load();
      } catch (e) {
        report(e);
      }
    });
    open(`Top up account ${a.id}`, el("p", { class: "hint" },
      "Sending the same idempotency key again applies the top-up once."), form);
  }

  async function keys(a) {
    const ks = (await ctx.api(`/api/v1/keys?owner=${encodeURIComponent(a.id)}&include_disabled=true&limit=1000`)).data;
    open(`Keys of ${a.id}`, ks.length
      ? table(["Name", "Label", "Status", "#Used (USD)", "#Limit (USD)", "#Requests"],
        ks.map((k) => [k.name, k.label, keyStatus(k), k.usage, k.limit ?? "unlimited", k.requests]), { id: "account-keys-table" })
      : el("p", {}, "This account has no keys."));
  }

  async function subscriptions(a) {
    const subs = (await ctx.api(`/api/v1/accounts/${encodeURIComponent(a.id)}/subscriptions`)).data;
    const act = async (s, path, body, done) => {
      try {
        await ctx.api(`/api/v1/subscriptions/${encodeURIComponent(s.id)}/${path}`, { method: "POST", body });
        ctx.say(`Subscription ${s.id} ${done}.`);
        await load();
        await subscriptions(a);
      } catch (e) {
        report(e);
      }
    };
    const live = (s) => !["canceled", "expired"].includes(s.status);
    const form = el("form", { id: "subscribe-form", class: "inline", autocomplete: "off" },
      field("subscribe-plan", "Plan", { name: "plan", required: true }),
      field("subscribe-trial", "Trial days", { name: "trial_days", inputmode: "numeric" }),
      el("button", { type: "submit" }, "Subscribe"));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const body = { plan: form.elements.plan.value.trim() };
      const trial = form.elements.trial_days.value.trim();
      if (/^\d+$/.test(trial)) body.trial_days = Number(trial);
      try {
        await ctx.api(`/api/v1/accounts/${encodeURIComponent(a.id)}/subscriptions`, { method: "POST", body });
        ctx.say(`Account ${a.id} subscribed to ${body.plan}.`);
        await load();
        await subscriptions(a);
      } catch (e) {
        report(e);
      }
    });
    open(`Subscriptions of ${a.id}`,
      subs.length
        ? table(["Id", "Plan", "Status", "Period start", "Period end", "Cancel at end", "#Grant (USD)", "#Price (USD)", "Actions"],
          subs.map((s) => ({
            attrs: { "data-subscription": s.id },
            cells: [s.id, s.next_plan ? `${s.plan} → ${s.next_plan}` : s.plan, s.status,
              s.current_period_start, s.current_period_end, s.cancel_at_period_end ? "yes" : "no",
              s.grant ?? "", s.price ?? "",
              live(s) ? el("div", { class: "actions" },
                // One key per paid period shown: a double click renews once.
                button("act-renew", "Renew", () => act(s, "renew", { idempotency_key: `admin-renew:${s.id}:${s.paid_through}` }, "renewed")),
                button("act-cancel-end", "Cancel at period end", () => act(s, "cancel", { at_period_end: true }, "cancels at the period's end")),
                button("act-cancel", "Cancel now", () => act(s, "cancel", { at_period_end: false }, "canceled"))) : ""],
          })), { id: "subscriptions-table" })
        : el("p", {}, "No subscriptions."),
      el("h4", {}, "New subscription"), form);
  }

  create.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = {};
    for (const n of ["id", "email", "name"]) {
      const v = create.elements[n].value.trim();
      if (v) body[n] = v;
    }
    try {
      const res = await ctx.api("/api/v1/accounts", { method: "POST", body });
      ctx.say(`Account ${res.data.id} created.`);
      create.reset();
      await load();
    } catch (e) {
      report(e);
    }
  });
  search.addEventListener("input", draw);
  await load();
}

export default { id: "accounts", title: "Accounts", mount };
