// The audit log: who changed what, newest first, filtered by actor and
// target. Through GET /api/v1/audit.

import { button, el, fill, table } from "../ui.js";

// How many entries a list shows.
const SHOWN = 200;
// The outbox and the audit log page oldest first by `after`; a console
// reads at most this many pages to find the newest.
const MAX_PAGES = 20;

// The newest SHOWN items of an oldest-first log paged by `after`:
// `url(after)` is a page's address, `seq(item)` its position.
export async function newest(ctx, url, seq) {
  let after = "0";
  let kept = [];
  for (let i = 0; i < MAX_PAGES; i++) {
    const page = (await ctx.api(url(after))).data;
    kept = kept.concat(page).slice(-SHOWN);
    if (page.length < 1000) break;
    after = String(seq(page[page.length - 1]));
  }
  return kept.reverse();
}

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
    const q = new URLSearchParams({ limit: "1000" });
    if (actor.value.trim()) q.set("actor", actor.value.trim());
    if (target.value.trim()) q.set("target", target.value.trim());
    const rows = await newest(ctx, (after) => `/api/v1/audit?after=${after}&${q}`, (a) => a.seq);
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
