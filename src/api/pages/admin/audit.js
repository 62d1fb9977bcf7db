// The audit log: who changed what, newest first, filtered by actor and
// target. Through GET /api/v1/audit.

import { button, el, fill, LOG_PAGE, newest, table } from "../ui.js";

async function mount(root, ctx) {
  const actor = el("input", { id: "audit-actor", type: "search", placeholder: "root" });
  const target = el("input", { id: "audit-target", type: "search", placeholder: "key hash or account id" });
  const list = el("div", { id: "audit-list" }, "Loading…");
  const report = (e) => ctx.say(e.message, "error");
  root.append(
    el("div", { class: "toolbar" },
      el("label", { for: "audit-actor" }, "Actor"), actor,
      el("label", { for: "audit-target" }, "Target"), target,
      button("secondary", "Refresh", () => load().catch(report))),
    list);

  async function load() {
    const q = new URLSearchParams({ limit: String(LOG_PAGE) });
    if (actor.value.trim()) q.set("actor", actor.value.trim());
    if (target.value.trim()) q.set("target", target.value.trim());
    const rows = await newest(ctx.api, (after) => `/api/v1/audit?after=${after}&${q}`, (a) => a.seq);
    fill(list, rows.length
      ? table(["#Seq", "Time", "Actor", "Action", "Target", "IP", "Before", "After"],
        rows.map((a) => ({
          attrs: { "data-seq": a.seq },
          cells: [a.seq, a.at, a.actor, a.action, a.target, a.ip || "",
            el("code", {}, brief(a.before)), el("code", {}, brief(a.after))],
        })), { id: "audit-table" })
      : el("p", {}, "No entries."));
  }
  actor.addEventListener("change", () => load().catch(report));
  target.addEventListener("change", () => load().catch(report));
  await load();
}

// A summary's scalar fields as `k=v` (exact text), for one table cell.
function brief(obj) {
  if (obj == null) return "";
  if (typeof obj !== "object") return String(obj);
  return Object.entries(obj).filter(([, v]) => v != null && typeof v !== "object")
    .slice(0, 8).map(([k, v]) => `${k}=${v}`).join(" ");
}

export default { id: "audit", title: "Audit log", mount };
