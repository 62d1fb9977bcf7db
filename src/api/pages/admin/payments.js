// Payments: the records with their status (filter by status and account),
// a manual payment (a bank transfer, idempotent on its reference), and the
// reconciliation report. Through /api/v1/payments….

import { button, el, facts, field, fill, pager, table } from "../ui.js";

const STATUSES = ["all", "succeeded", "refunded", "partially_refunded", "needs_attention", "failed"];

async function mount(root, ctx) {
  const status = el("select", { id: "payment-status" }, STATUSES.map((s) => el("option", { value: s }, s)));
  const account = el("input", { id: "payment-account", type: "search", placeholder: "account id" });
  const list = el("div", { id: "payment-list" }, "Loading…");
  const recon = el("div", { id: "reconcile" });
  const report = (e) => ctx.say(e.message, "error");
  const manual = el("form", { id: "manual-payment-form", class: "inline", autocomplete: "off" },
    field("manual-account", "Account", { name: "account", required: true }),
    field("manual-amount", "Amount (USD)", { name: "amount", required: true, inputmode: "decimal" }),
    field("manual-reference", "Reference", { name: "reference", required: true, placeholder: "BANK-2026-001" }),
    el("button", { type: "submit" }, "Record payment"));

  const pages = pager("payments", load);
  root.append(
    el("details", { class: "create" }, el("summary", {}, "Record a manual payment"),
      el("p", { class: "hint" }, "The same reference again applies nothing twice."), manual),
    el("div", { class: "toolbar" },
      el("label", { for: "payment-status" }, "Status"), status,
      el("label", { for: "payment-account" }, "Account"), account,
      button("secondary", "Refresh", () => pages.reload().catch(report)),
      el("button", { type: "button", id: "reconcile-button", class: "secondary", on: { click: () => reconcile().catch(report) } }, "Reconcile (30 days)")),
    list, pages.node, recon);

  // One page of the records (newest first); answers how many it got.
  async function load(offset, limit) {
    const q = new URLSearchParams({ offset: String(offset), limit: String(limit) });
    if (status.value !== "all") q.set("status", status.value);
    if (account.value.trim()) q.set("account", account.value.trim());
    const ps = (await ctx.api(`/api/v1/payments?${q}`)).data;
    fill(list, ps.length
      ? table(["Time", "Id", "Provider", "Provider id", "For", "#Amount", "Currency", "Kind", "Status", "#Refunded", "Reason"],
        ps.map((p) => ({
          attrs: { "data-payment": p.id },
          cells: [p.created_at, p.id, p.provider, p.provider_id, p.account ? `account ${p.account}` : p.key ? `key ${p.key}` : "",
            p.amount, p.currency, p.kind, el("span", { class: `status ${p.status}` }, p.status), p.refunded, p.reason || ""],
        })), { id: "payments-table" })
      : el("p", {}, "No payments."));
    return ps.length;
  }

  async function reconcile() {
    const r = (await ctx.api("/api/v1/payments/reconcile")).data;
    fill(recon,
      el("h3", {}, `Reconciliation ${r.start} – ${r.end}`),
      Object.keys(r.totals).length
        ? table(["Provider", "#Payments", "#Amount (USD)", "#Refunded (USD)", "#Needs attention"],
          Object.entries(r.totals).map(([p, t]) => [p, t.payments, t.amount, t.refunded, t.needs_attention]), { id: "reconcile-totals" })
        : el("p", {}, "No payments in this range."),
      facts([
        ["Payments that made no ledger entry", String(r.payments_without_ledger.length), "reconcile-unapplied"],
        ["Top-ups no payment made", String(r.topups_without_payment.length), "reconcile-orphans"],
      ]),
      r.payments_without_ledger.length
        ? table(["Id", "Provider", "For", "#Amount", "Status", "Reason"],
          r.payments_without_ledger.map((p) => [p.id, p.provider, p.account || p.key || "", p.amount, p.status, p.reason || ""]))
        : "",
      r.topups_without_payment.length
        ? table(["Time", "Target", "Id", "#Amount (USD)", "Reason", "Idempotency key"],
          r.topups_without_payment.map((o) => [o.at, o.target, o.id, o.amount, o.reason, o.idempotency_key || ""]))
        : "");
  }

  manual.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { kind: "topup" };
    for (const n of ["account", "amount", "reference"]) body[n] = manual.elements[n].value.trim();
    try {
      const res = await ctx.api("/api/v1/payments", { method: "POST", body });
      ctx.say(res.data.replayed
        ? `Payment ${body.reference} was already recorded (${res.data.id}).`
        : `Payment ${res.data.id} recorded: ${res.data.amount} USD to ${body.account}.`);
      manual.reset();
      await pages.reset();
    } catch (e) {
      report(e);
    }
  });
  status.addEventListener("change", () => pages.reset().catch(report));
  account.addEventListener("change", () => pages.reset().catch(report));
  await pages.reset();
}

export default { id: "payments", title: "Payments", mount };
