// The key holder's page. Reads only what the key itself may read:
// /api/v1/key (status, limits, its account's remaining money) and
// /api/usage/token/… (usage); "Top up" calls /api/v1/key/checkout.

import { api, copyButton, el, facts, fill, keyStatus, randomId, say, session, table, usd } from "./ui.js";
import { barChart } from "./chart.js";

const $ = (id) => document.getElementById(id);
const PAGE_SIZE = 10;
let key = null;
let page = 1;

function signedOut(message) {
  key = null;
  session.clear("tollgate.key");
  $("view").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  say($("notice"), message, message ? "error" : "info");
  $("key-input").focus();
}

// A refused key (401/403) ends the session; other errors are shown.
function failed(e) {
  if (e.status === 401 || e.status === 403) signedOut(e.message);
  else say($("notice"), e.message, "error");
}

async function show() {
  $("sign-in").hidden = true;
  say($("notice"), "Loading…");
  const nowS = Math.floor(Date.now() / 1000);
  try {
    const [status, detail, hourly] = await Promise.all([
      api("/api/v1/key", key),
      api("/api/usage/token/detail", key),
      api(`/api/usage/token/chart?granularity=hour&start=${nowS - 48 * 3600}`, key),
    ]);
    render(status.data, detail.data, hourly.data);
    await Promise.all([logs(), offerTopUp()]);
    say($("notice"), "");
    $("view").hidden = false;
    $("sign-out").hidden = false;
  } catch (e) {
    failed(e);
  }
}

function render(k, d, hourly) {
  fill($("label"), k.label);
  const state = keyStatus(k);
  const rate = [
    k.rate_limit ? `${k.rate_limit.requests} requests / ${k.rate_limit.interval}` : "no request rate limit",
    k.concurrency != null ? `${k.concurrency} concurrent (${k.in_flight} now)` : null,
  ].filter(Boolean).join(", ");
  fill($("key-facts"), facts([
    ["Status", el("span", { class: `status ${state}` }, state), "status"],
    ["Limit", usd(k.limit) + (k.limit_reset ? ` per ${k.limit_reset}` : ""), "limit"],
    ["Used", usd(k.usage), "usage"],
    ["Remaining", usd(k.limit_remaining), "remaining"],
    k.account != null ? ["Account", k.account, "account"] : null,
    k.account != null ? ["Account balance left", usd(k.account_remaining), "account-remaining"] : null,
    k.subscription ? ["Plan", `${k.subscription.plan} (${k.subscription.status.replace("_", " ")})`, "plan"] : null,
    ["Used today / this week / this month", `${k.usage_daily} / ${k.usage_weekly} / ${k.usage_monthly} USD`, "windows"],
    ["Requests", k.max_requests != null ? `${k.requests} of ${k.max_requests}` : `${k.requests} (no maximum)`, "requests"],
    ["Expires", k.expires_at || "never", "expires"],
    ["Rate limits", rate, "rate"],
    ["Models", k.models.length ? k.models.join(", ") : "all", "models"],
  ].filter(Boolean)));
  const days = d.by_day.map((p) => ({ label: p.date, value: p.cost }));
  const dayReq = d.by_day.map((p) => ({ label: p.date, value: p.requests }));
  const hours = hourly.data.map((p) => ({ label: p.date.slice(5, 13).replace("T", " ") + "h", value: p.cost }));
  const hourReq = hourly.data.map((p) => ({ label: p.date.slice(5, 13).replace("T", " ") + "h", value: p.requests }));
  fill($("charts"),
    barChart(days, { caption: `Spend per day, last 30 days (total ${d.summary.total_cost} USD)`, unit: " USD", id: "chart-day-cost" }),
    barChart(dayReq, { caption: `Requests per day (total ${d.summary.total_requests})`, id: "chart-day-requests" }),
    barChart(hours, { caption: "Spend per hour, last 48 h", unit: " USD", id: "chart-hour-cost" }),
    barChart(hourReq, { caption: "Requests per hour, last 48 h", id: "chart-hour-requests" }));
  fill($("by-model"), d.by_model.length
    ? table(["Model", "#Cost (USD)", "#Requests", "#Tokens", "#Share %"],
      d.by_model.map((m) => [m.model, m.cost, m.requests, m.tokens, m.percentage]), { id: "models-table" })
    : el("p", {}, "No usage in the last 30 days."));
  const base = `${location.origin}/v1`;
  const snippet = `from openai import OpenAI\n\nclient = OpenAI(\n    base_url="${base}",\n    api_key=os.environ["TOLLGATE_KEY"],  # your sk-… key\n)\nreply = client.chat.completions.create(\n    model="gpt-4o-mini",\n    messages=[{"role": "user", "content": "Hello"}],\n)\nprint(reply.choices[0].message.content)`;
  const full = `import os\n${snippet}`;
  fill($("use"),
    facts([["Base URL", el("code", { id: "base-url" }, base)]]),
    el("div", { class: "snippet" }, el("pre", { id: "snippet" }, el("code", {}, full)), copyButton(full, "Copy snippet")));
}

// Whether payments are configured: the key checkout answers 404 when they
// are not, and refuses an empty body (400, nothing started) when they are.
// No other call tells a key holder, and this one changes nothing.
async function offerTopUp() {
  let offered = false;
  try {
    await api("/api/v1/key/checkout", key, { method: "POST", body: {} });
  } catch (e) {
    if (e.status === 401 || e.status === 403) throw e;
    offered = e.status === 400;
  }
  $("topup").hidden = !offered;
}

async function topUp(ev) {
  ev.preventDefault();
  const amount = $("topup-amount").value.trim();
  if (!amount) return;
  $("topup-button").disabled = true;
  try {
    const res = await api("/api/v1/key/checkout", key, {
      method: "POST",
      body: { amount, idempotency_key: randomId() },
    });
    say($("notice"), "Opening the payment page…");
    location.assign(res.data.url);
  } catch (e) {
    failed(e);
  } finally {
    $("topup-button").disabled = false;
  }
}

async function logs() {
  const data = (await api(`/api/usage/token/logs?page=${page}&page_size=${PAGE_SIZE}`, key)).data;
  const total = Number(data.total);
  const pages = Math.max(1, Math.ceil(total / PAGE_SIZE));
  fill($("logs"), data.items.length
    ? table(["Time", "Model", "#Tokens (in / out)", "#Cost (USD)", "#Latency ms", "#Status", "Estimated"],
      data.items.map((r) => ({
        attrs: { "data-request-id": r.request_id },
        cells: [r.time, r.model, `${r.prompt_tokens} / ${r.completion_tokens}`, r.cost, r.latency_ms, r.status, r.estimated ? "yes" : "no"],
      })), { id: "logs-table" })
    : el("p", {}, "No requests yet."));
  fill($("page-info"), `page ${page} of ${pages} (${data.total} requests)`);
  $("prev").disabled = page <= 1;
  $("next").disabled = page >= pages;
}

async function turn(delta) {
  page += delta;
  try {
    await logs();
  } catch (e) {
    page -= delta;
    failed(e);
  }
}

// A deep link /portal#key=sk-… hands the key over without it reaching
// any server or log; take it and remove it from the address bar and the
// history at once.
function takeHashKey() {
  const m = /^#key=(.+)$/.exec(location.hash);
  if (!m) return false;
  session.set("tollgate.key", decodeURIComponent(m[1]));
  history.replaceState(null, "", location.pathname + location.search);
  return true;
}

function start() {
  takeHashKey();
  // The same link followed from this page changes only the fragment.
  window.addEventListener("hashchange", () => {
    if (!takeHashKey()) return;
    key = session.get("tollgate.key");
    page = 1;
    show();
  });
  $("sign-in-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const v = $("key-input").value.trim();
    $("key-input").value = "";
    if (!v) return;
    key = v;
    session.set("tollgate.key", v);
    page = 1;
    show();
  });
  $("sign-out").addEventListener("click", () => signedOut(""));
  $("topup-form").addEventListener("submit", topUp);
  $("prev").addEventListener("click", () => turn(-1));
  $("next").addEventListener("click", () => turn(1));
  key = session.get("tollgate.key");
  if (key) show();
  else signedOut("");
}

start();
