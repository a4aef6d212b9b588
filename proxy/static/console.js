// Vienna approvals console: one static page, no build step, no external assets.
// Every value from the API goes into the page as text (textContent), never as markup.
"use strict";

const TOKEN_KEY = "vienna.operator-token";
const REFRESH_MS = 3000;
const $ = (id) => document.getElementById(id);
const cards = new Map(); // warrant request id -> its card (kept, so a half-typed justification survives a refresh)
let timer = null;

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(method, path, body) {
  const headers = { "Authorization": "Bearer " + token() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const answer = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), credentials: "omit", cache: "no-store" });
  let data = null;
  try { data = await answer.json(); } catch (e) { data = null; }
  if (!answer.ok) {
    const reason = data && data.reason ? data.reason : ("HTTP " + answer.status);
    const error = new Error(reason);
    error.status = answer.status;
    error.code = data && data.reason_code;
    throw error;
  }
  return { data, headers: answer.headers };
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function ago(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return seconds + " s";
  if (seconds < 3600) return Math.round(seconds / 60) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

function field(list, name, value, mono) {
  list.append(el("dt", name));
  const dd = el("dd", value === undefined || value === null || value === "" ? "—" : value);
  if (mono) dd.classList.add("mono");
  list.append(dd);
}

function fill(card, item) {
  const now = Date.now() / 1000;
  const request = item.request || {};
  const intent = item.intent || {};
  card.querySelector(".title").replaceChildren(
    el("span", item.tier, "tier tier-" + item.tier),
    el("span", (intent.action || "?") + (intent.target ? " " + intent.target : ""), "mono"),
    el("span", item.id, "mono"),
  );
  const list = card.querySelector("dl");
  list.replaceChildren();
  if (item.sidecar) field(list, "sidecar", item.sidecar);
  field(list, "agent", item.agent);
  field(list, "request", (request.method || "") + " " + (request.url || ""), true);
  field(list, "content type", request.content_type);
  field(list, "body SHA-256", request.body_sha256, true);
  field(list, "rule", item.rule);
  field(list, "age", ago(now - item.created_at));
  field(list, "expires in", ago(item.expires_at - now));
  field(list, "approvals", item.approvals + " of " + item.approvals_required);
  const votes = (item.votes || []).map((v) => v.operator + " (" + v.decision + (v.justification ? ": " + v.justification : "") + ")");
  field(list, "votes", votes.join("; "));
  const preview = card.querySelector("pre.preview");
  preview.textContent = request.body_preview || (request.params ? JSON.stringify(request.params, null, 1) : "(no body)");
}

function newCard(item) {
  const card = el("article", null, "card");
  card.dataset.id = item.id;
  card.id = "card-" + item.id;
  card.append(el("h3", null, "title"), el("dl"), el("pre", null, "preview"));
  const vote = el("div", null, "vote");
  const reason = el("textarea");
  reason.placeholder = item.tier === "T3" ? "Justification (required for T3)" : "Justification";
  reason.setAttribute("aria-label", "justification for " + item.id);
  const approve = el("button", "Approve", "approve");
  const deny = el("button", "Deny", "deny");
  const problem = el("span", null, "card-error");
  approve.type = deny.type = "button";
  approve.addEventListener("click", () => cast(item.id, true, reason, problem, item.tier));
  deny.addEventListener("click", () => cast(item.id, false, reason, problem, item.tier));
  vote.append(reason, approve, deny, problem);
  card.append(vote);
  return card;
}

async function cast(id, approve, reason, problem, tier) {
  problem.textContent = "";
  const justification = reason.value.trim();
  if (approve && tier === "T3" && !justification) {
    problem.textContent = "A T3 approval needs a justification.";
    return;
  }
  try {
    await api("POST", "/v1/warrant-requests/" + encodeURIComponent(id) + "/" + (approve ? "approve" : "deny"), { justification });
    reason.value = "";
    await refresh();
  } catch (error) {
    problem.textContent = error.message;
    if (error.status === 401) signOut(error.message);
  }
}

function renderPending(items) {
  const container = $("requests");
  const seen = new Set();
  for (const item of items) {
    seen.add(item.id);
    let card = cards.get(item.id);
    if (!card) {
      card = newCard(item);
      cards.set(item.id, card);
    }
    fill(card, item);
    container.append(card); // (re-appending keeps the API's order)
  }
  for (const [id, card] of cards) {
    if (!seen.has(id)) { card.remove(); cards.delete(id); }
  }
  $("pending-count").textContent = "(" + items.length + ")";
  $("pending-empty").hidden = items.length > 0;
  const wanted = decodeURIComponent(location.hash.slice(1));
  for (const [id, card] of cards) card.classList.toggle("highlight", id === wanted);
}

function outcome(event) {
  const p = event.payload || {};
  if (event.type === "decision") return (p.decision || "") + (p.forwarded ? ", forwarded" : "") + (p.reason_code ? " (" + p.reason_code + ")" : "");
  if (event.type === "approval") return (p.operator || "") + ": " + (p.decision || p.event || "") + (p.justification ? " — " + p.justification : "");
  if (event.type === "warrant") return "warrant " + (p.warrant_id || "") + " for " + (p.warrant_request_id || "");
  if (event.type === "verification") return (p.event || "") + " " + (p.warrant_id || "");
  if (event.type === "warrant_request") return "opened " + (p.warrant_request_id || "");
  return p.event || "";
}

function renderEvents(events) {
  const rows = events.filter((e) => e.type !== "intent" && e.type !== "execution").slice(-40).reverse().map((event) => {
    const row = el("tr");
    const p = event.payload || {};
    const intent = p.intent ? (p.intent.action || "") + " " + (p.intent.target || "") : "";
    row.append(
      el("td", event.seq),
      el("td", new Date(event.ts * 1000).toLocaleTimeString()),
      el("td", event.type),
      el("td", event.agent),
      el("td", intent, "mono"),
      el("td", outcome(event)),
    );
    return row;
  });
  $("events").replaceChildren(...rows);
}

async function refresh() {
  try {
    const pending = await api("GET", "/v1/warrant-requests?status=pending&limit=200");
    renderPending(pending.data);
    const head = await api("GET", "/v1/audit?limit=1");
    const after = Math.max(0, (head.data.head_seq || 0) - 200);
    const recent = await api("GET", "/v1/audit?after=" + after + "&limit=200");
    renderEvents(recent.data.events || []);
    showError("");
    $("refreshed").textContent = "Updated " + new Date().toLocaleTimeString() + "; refreshes every " + REFRESH_MS / 1000 + " s.";
  } catch (error) {
    showError(error.message);
    if (error.status === 401) signOut(error.message);
  }
}

async function signIn(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
  try {
    await api("GET", "/v1/warrant-requests?status=pending&limit=1");
  } catch (error) {
    signOut(error.message);
    return;
  }
  $("sign-in").hidden = true;
  $("pending").hidden = false;
  $("recent").hidden = false;
  $("sign-out").hidden = false;
  $("who").textContent = "signed in";
  showError("");
  await refresh();
  if (timer === null) timer = setInterval(refresh, REFRESH_MS);
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  if (timer !== null) { clearInterval(timer); timer = null; }
  for (const card of cards.values()) card.remove();
  cards.clear();
  $("events").replaceChildren();
  $("sign-in").hidden = false;
  $("pending").hidden = true;
  $("recent").hidden = true;
  $("sign-out").hidden = true;
  $("who").textContent = "";
  showError(message || "");
}

document.addEventListener("DOMContentLoaded", () => {
  $("where").textContent = location.host;
  $("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    $("token").value = "";
    if (value) signIn(value);
  });
  $("sign-out").addEventListener("click", () => signOut(""));
  window.addEventListener("hashchange", () => refresh());
  if (token()) signIn(token());
});
