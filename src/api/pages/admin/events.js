// Events and webhook deliveries: the outbox (newest first, filter by type
// glob), each event's JSON, and per event × endpoint the delivery state,
// with "Redeliver". Through /api/v1/events… and /api/v1/webhooks/deliveries.

import { button, el, fill, LOG_PAGE, newest, pager, table } from "../ui.js";

const DELIVERY = ["all", "pending", "delivered", "failed", "skipped"];

async function mount(root, ctx) {
  const type = el("input", { id: "event-type", type: "search", placeholder: "key.* or payment.succeeded" });
  const dstatus = el("select", { id: "delivery-status" }, DELIVERY.map((s) => el("option", { value: s }, s)));
  const events = el("div", { id: "event-list" }, "Loading…");
  const deliveries = el("div", { id: "delivery-list" }, "Loading…");
  const report = (e) => ctx.say(e.message, "error");

  const pages = pager("deliveries", loadDeliveries);
  root.append(
    el("div", { class: "toolbar" },
      el("label", { for: "event-type" }, "Type"), type,
      button("secondary", "Refresh", () => load().catch(report))),
    events,
    el("h3", {}, "Webhook deliveries"),
    el("div", { class: "toolbar" }, el("label", { for: "delivery-status" }, "Status"), dstatus),
    deliveries, pages.node);

  async function redeliver(id) {
    try {
      const res = await ctx.api(`/api/v1/events/${encodeURIComponent(id)}/redeliver`, { method: "POST" });
      ctx.say(`Event ${res.id} queued again for ${res.targets.length} endpoint(s).`);
      await pages.reload();
    } catch (e) {
      report(e);
    }
  }

  async function loadEvents() {
    const t = type.value.trim();
    const evs = await newest(ctx.api, (after) => `/api/v1/events?after=${after}&limit=${LOG_PAGE}${t ? `&type=${encodeURIComponent(t)}` : ""}`,
      (e) => e.id);
    fill(events, evs.length
      ? table(["Time", "Id", "Type", "Data", "Actions"],
        evs.map((e) => ({
          attrs: { "data-event": e.id },
          cells: [e.timestamp, e.id, e.type, el("code", {}, summary(e.data)),
            el("div", { class: "actions" }, button("act-redeliver", "Redeliver", () => redeliver(e.id)))],
        })), { id: "events-table" })
      : el("p", {}, "No events."));
  }

  // One page of the deliveries; answers how many it got.
  async function loadDeliveries(offset, limit) {
    const q = dstatus.value === "all" ? "" : `&status=${dstatus.value}`;
    const ds = (await ctx.api(`/api/v1/webhooks/deliveries?offset=${offset}&limit=${limit}${q}`)).data;
    fill(deliveries, ds.length
      ? table(["Event", "Endpoint", "Status", "#Attempts", "Next attempt", "#Last status", "Last error", "Updated", "Actions"],
        ds.map((d) => [d.event_id, d.target, d.status, d.attempts, d.next_attempt_at || "", d.last_status ?? "",
          d.last_error || "", d.updated_at,
          el("div", { class: "actions" }, button("act-redeliver", "Redeliver", () => redeliver(d.event_id)))]),
        { id: "deliveries-table" })
      : el("p", {}, "No deliveries (no webhook endpoint is configured, or none matched)."));
    return ds.length;
  }

  const load = () => Promise.all([loadEvents(), pages.reload()]);
  type.addEventListener("change", () => loadEvents().catch(report));
  dstatus.addEventListener("change", () => pages.reset().catch(report));
  await load();
}

// One line of an event's object, for the table (the exact text of its
// fields; the full object is one API call away).
function summary(data) {
  if (data == null || typeof data !== "object") return String(data ?? "");
  const keys = ["name", "id", "label", "account", "amount", "status", "reason"].filter((k) => data[k] != null && typeof data[k] !== "object");
  return keys.map((k) => `${k}=${data[k]}`).join(" ");
}

export default { id: "events", title: "Events", mount };
