// The operator's console. Each section is one module under admin/ that
// exports {id, title, mount(root, ctx)}; a section whose API does not exist
// yet has no module and so is absent. To add one, write its module and
// list it in SECTIONS.

import { api, el, fill, say, session } from "./ui.js";
import keys from "./admin/keys.js";
import usage from "./admin/usage.js";
import accounts from "./admin/accounts.js";
import payments from "./admin/payments.js";
import events from "./admin/events.js";
import audit from "./admin/audit.js";

const SECTIONS = [keys, accounts, payments, events, audit, usage];
const $ = (id) => document.getElementById(id);
let token = null;

// What a section gets: the API with the admin token, and the shared
// notice line. A refused token ends the session.
const ctx = {
  api: async (path, opts) => {
    try {
      return await api(path, token, opts);
    } catch (e) {
      if (e.status === 401) signedOut(e.message);
      throw e;
    }
  },
  say: (message, kind) => say($("notice"), message, kind),
};

function signedOut(message) {
  token = null;
  session.clear("tollgate.admin");
  $("view").hidden = true;
  $("view").replaceChildren();
  $("sections").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  say($("notice"), message, message ? "error" : "info");
  $("token-input").focus();
}

async function open() {
  try {
    // Cheapest admin call: proves the token before anything is drawn. A
    // 403 is a valid token without `keys:read` (a scoped token): it signs
    // in, and each section it may not read shows the API's refusal.
    await api("/api/v1/keys?limit=1", token);
  } catch (e) {
    if (e.status !== 403) {
      signedOut(e.message);
      return;
    }
  }
  say($("notice"), "");
  $("sign-in").hidden = true;
  $("sign-out").hidden = false;
  const view = $("view");
  view.replaceChildren();
  fill($("sections"), SECTIONS.map((s) => el("a", { href: `#${s.id}` }, s.title)));
  $("sections").hidden = false;
  view.hidden = false;
  for (const s of SECTIONS) {
    const root = el("section", { id: s.id, "aria-labelledby": `${s.id}-title` },
      el("h2", { id: `${s.id}-title` }, s.title));
    view.append(root);
    s.mount(root, ctx).catch((e) => ctx.say(e.message, "error"));
  }
}

$("sign-in-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const v = $("token-input").value.trim();
  $("token-input").value = "";
  if (!v) return;
  token = v;
  session.set("tollgate.admin", v);
  open();
});
$("sign-out").addEventListener("click", () => signedOut(""));
token = session.get("tollgate.admin");
if (token) open();
