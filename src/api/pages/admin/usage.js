// Gateway usage: totals, by model, by day (charts) and the top keys, from
// GET /api/v1/usage.

import { el, facts, fill, table } from "../ui.js";
import { barChart } from "../chart.js";

async function mount(root, ctx) {
  const body = el("div", { id: "usage-body" }, "Loading…");
  const refresh = el("button", { type: "button", id: "usage-refresh" }, "Refresh");
  root.append(refresh, body);
  const load = async () => {
    const d = (await ctx.api("/api/v1/usage?top=10")).data;
    const s = d.summary;
    fill(body,
      facts([
        ["Spend (30 days)", `${s.total_cost} USD`, "usage-total-cost"],
        ["Requests", s.total_requests, "usage-total-requests"],
        ["Tokens (in / out)", `${s.prompt_tokens} / ${s.completion_tokens}`],
        ["Errors", s.errors],
        ["Average latency", `${s.avg_latency_ms} ms`],
        ["Keys with usage", d.keys_with_usage],
      ]),
      el("div", { class: "charts" },
        barChart(d.by_day.map((p) => ({ label: p.date, value: p.cost })), { caption: "Spend per day", unit: " USD" }),
        barChart(d.by_day.map((p) => ({ label: p.date, value: p.requests })), { caption: "Requests per day" }),
        barChart(d.by_model.map((m) => ({ label: m.model, value: m.cost })), { caption: "Spend by model", unit: " USD" })),
      el("h3", {}, "By model"),
      table(["Model", "#Cost (USD)", "#Requests", "#Tokens", "#Share %"],
        d.by_model.map((m) => [m.model, m.cost, m.requests, m.tokens, m.percentage])),
      el("h3", {}, "Top keys"),
      table(["Name", "Label", "Owner", "#Cost (USD)", "#Requests", "#Tokens"],
        d.by_key.map((k) => [k.name, k.label, k.owner || "", k.cost, k.requests, k.tokens])
          .concat([["all other keys", "", "", d.other_keys.cost, d.other_keys.requests, d.other_keys.tokens]]),
        { id: "top-keys" }));
  };
  refresh.addEventListener("click", () => load().catch((e) => ctx.say(e.message, "error")));
  await load();
}

export default { id: "usage", title: "Usage", mount };
