// The AsyncQ fleet page: reads api/fleet every 5 s and renders it; actions POST JSON.
//
// Every request is same-origin, so the browser sends the `_token` cookie the Airflow UI set at sign-in.
// Every value from the fleet is written with textContent, never as HTML.
"use strict";

const REFRESH_MS = 5000;
const APP = new URL("./", window.location.href); // <base>/asyncq/
const UI = new URL("../", APP); // <base>/: the Airflow UI
let timer = null;
let inFlight = false;

// ------------------------------------------------------------------------------------ formatting
const MIB = 1024 * 1024;

function size(bytes) {
  if (bytes === null || bytes === undefined || bytes === "") return "-";
  const n = Number(bytes);
  if (n >= 1024 * MIB) return `${(n / 1024 / MIB).toFixed(1)} GiB`;
  return `${Math.round(n / MIB)} MiB`;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const s = Math.max(0, Number(seconds));
  if (s < 90) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 5400) return `${Math.floor(s / 60)} m ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} m`;
}

function when(epoch) {
  const n = Number(epoch);
  if (!n) return "-";
  const d = new Date(n * 1000);
  const pad = (v) => String(v).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

// ------------------------------------------------------------------------------------ DOM helpers
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function td(content, cls) {
  return el("td", { class: cls }, content);
}

function fill(tableId, rows, columns, emptyText) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { class: "empty", colspan: columns }, emptyText))]));
}

function bar(used, total, label, detail) {
  const ratio = total > 0 ? Math.min(1, Math.max(0, used / total)) : 0;
  const cls = ratio >= 1 ? "bar full" : ratio >= 0.8 ? "bar high" : "bar";
  const fillSpan = el("span");
  fillSpan.style.width = `${Math.round(ratio * 100)}%`; // CSSOM: the page's CSP refuses style attributes
  return el("span", {}, el("span", { class: cls }, fillSpan), label,
    detail ? el("div", { class: "muted" }, detail) : null);
}

function healthBadge(health) {
  const cls = health === "ok" ? "ok" : health.startsWith("stuck") ? "bad" : "warn";
  return el("span", { class: `badge ${cls}` }, health);
}

// A link to a page of the Airflow UI. Inside the UI's iframe (sandboxed without allow-top-navigation) a
// plain target=_top link is blocked, so the click is handed to the UI's own router in the parent frame.
function uiLink(path, text) {
  const href = new URL(path.replace(/^\//, ""), UI).href;
  return el("a", {
    href, target: "_top",
    onclick: (event) => {
      if (window.top === window) return;
      try {
        const top = window.top;
        const idx = (top.history.state && Number.isInteger(top.history.state.idx)) ? top.history.state.idx + 1 : 0;
        top.history.pushState({ usr: null, key: Math.random().toString(36).slice(2, 10), idx }, "", href);
        top.dispatchEvent(new PopStateEvent("popstate", { state: top.history.state }));
        event.preventDefault();
      } catch (_error) {
        // a parent of another origin: let the browser follow the link
      }
    },
  }, text);
}

// ------------------------------------------------------------------------------------ requests
async function request(method, path, body) {
  const response = await fetch(new URL(path, APP), {
    method,
    credentials: "same-origin",
    cache: "no-store",
    headers: { Accept: "application/json", ...(body ? { "Content-Type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  let data = null;
  try { data = await response.json(); } catch (_error) { data = null; }
  if (!response.ok) {
    const detail = data && data.detail ? (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)) : response.statusText;
    const error = new Error(response.status === 401 ? "Not signed in: sign in to Airflow and reload this page."
      : response.status === 403 ? `Not allowed: ${detail}` : `${response.status}: ${detail}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

function showError(message) {
  const banner = document.getElementById("error");
  banner.textContent = message || "";
  banner.hidden = !message;
}

// A confirmation dialog (window.confirm is blocked in the sandboxed iframe). Resolves to null when
// cancelled, else to the comment typed (an empty string when the dialog asks for none).
function confirmDialog(text, { comment = false, okText = "Confirm" } = {}) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-comment-label").hidden = !comment;
  const input = document.getElementById("confirm-comment");
  input.value = "";
  document.getElementById("confirm-ok").textContent = okText;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok" ? input.value : null), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
    (comment ? input : document.getElementById("confirm-cancel")).focus();
  });
}

// What the last action did (or why it failed); stays until the next action.
function notify(message, isError) {
  const notice = document.getElementById("notice");
  notice.textContent = message;
  notice.className = isError ? "banner" : "banner done";
  notice.hidden = false;
}

async function act(path, body, button, describe) {
  if (button) button.disabled = true;
  try {
    notify(describe(await request("POST", path, body)), false);
  } catch (error) {
    notify(error.message, true);
  } finally {
    if (button) button.disabled = false;
    refresh();
  }
}

// ------------------------------------------------------------------------------------ rendering
function workerRow(w, canControl) {
  const m = w.maintenance;
  const maintenance = m ? `on${m.comment ? `: ${m.comment}` : ""}${m.by ? ` (${m.by}, ${when(m.at)})` : ""}` : "-";
  const budget = Number(w.memory_budget) || 0;
  const reserved = Number(w.memory_reserved) || 0;
  let action = null;
  if (canControl) {
    action = m
      ? el("button", { type: "button", dataset: { action: "maintenance-off" },
        onclick: (e) => act("api/maintenance", { worker: w.worker, on: false }, e.target,
          () => `${w.worker}: maintenance off; it takes work again`) }, "End maintenance")
      : el("button", { type: "button", dataset: { action: "maintenance-on" },
        onclick: async (e) => {
          const comment = await confirmDialog(`Put ${w.worker} in maintenance? It takes no new work and finishes what it runs.`,
            { comment: true, okText: "Start maintenance" });
          if (comment !== null) {
            act("api/maintenance", { worker: w.worker, on: true, comment }, e.target,
              () => `${w.worker}: maintenance on; it takes no new work and finishes what it runs`);
          }
        } }, "Maintenance…");
  }
  return el("tr", { dataset: { worker: w.worker } },
    td(w.worker, "name"),
    td(healthBadge(String(w.health))),
    td(w.version || "-"),
    td((w.queues || []).join(", ") || "-"),
    td(bar(Number(w.running) || 0, Number(w.slots) || 0, `${w.running ?? "-"} / ${w.slots ?? "-"}`), "num"),
    td(bar(reserved, budget, `${size(reserved)} of ${size(budget)}`,
      `${size(budget - reserved)} free · ${size(w.memory_in_use)} in use`), "num"),
    td(maintenance, m ? "warn" : undefined),
    td(w.native || "-"),
    td(w.heartbeat_age_s === null ? "-" : `${age(w.heartbeat_age_s)} ago`, "num"),
    td(action));
}

function taskRow(t) {
  const key = t.key || {};
  const label = key.dag_id ? `${key.dag_id} / ${key.task_id}${key.map_index >= 0 ? ` [${key.map_index}]` : ""}` : t.task;
  const memory = `${size(t.pss)} / ${size(t.request)} / ${t.limit ? size(t.limit) : "no limit"}`;
  const over = t.limit && t.pss > 0.9 * t.limit;
  return el("tr", { dataset: { task: t.task } },
    td(t.ti_path ? uiLink(t.ti_path, label) : label),
    td(key.try_number ?? "-", "num"),
    td(t.worker),
    td(age(t.runtime_s), "num"),
    td(memory, over ? "num bad" : "num"),
    td(t.pid ?? "-", "num"));
}

function queueRow(q) {
  const steps = Object.entries(q.by_step || {}).map(([step, n]) => `${step}: ${n}`).join("  ") || "-";
  return el("tr", { dataset: { queue: q.queue } },
    td(q.queue),
    td(q.depth, "num"),
    td(steps, "num"),
    td(q.oldest_age_s === null ? "-" : age(q.oldest_age_s), "num"),
    td((q.consumers || []).join(", ") || "none"),
    td(q.unconsumed ? el("span", { class: "bad" }, "no live worker consumes this queue") : null));
}

function deadLetterRow(d, canControl) {
  const replay = canControl && d.id ? el("button", { type: "button", dataset: { action: "replay" },
    onclick: async (e) => {
      const ok = await confirmDialog(`Replay ${d.id} to queue ${d.queue || "(default)"}? It runs again.`, { okText: "Replay" });
      if (ok !== null) {
        act("api/dead-letters/replay", { index: d.index, id: d.id }, e.target,
          (r) => `replayed ${r.replayed} to queue ${r.queue}`);
      }
    } }, "Replay…") : null;
  return el("tr", { dataset: { deadLetter: d.id || "" } },
    td(d.index, "num"), td(d.id || "-"), td(d.queue || "-"), td(d.hostname || "-"),
    td(d.error || "-", "error"), td(when(d.at), "num"), td(replay));
}

const EVENT_NAMES = { worker_lost: "worker lost", lease_expired: "lease expired", memory_kill: "memory kill",
  republished: "republished", dead_letter: "dead letter" };

function eventRow(e) {
  const details = Object.entries(e).filter(([k]) => !["kind", "at", "id"].includes(k))
    .map(([k, v]) => `${k}=${v}`).join("  ");
  const cls = ["worker_lost", "memory_kill", "dead_letter"].includes(e.kind) ? "bad" : "warn";
  return el("tr", { dataset: { event: e.kind } },
    td(when(e.at), "num"), td(el("span", { class: cls }, EVENT_NAMES[e.kind] || e.kind)), td(details, "error"));
}

function render(data) {
  const can = Boolean(data.can_control);
  document.getElementById("broker").textContent = `broker ${data.broker} · prefix ${data.key_prefix}`;
  document.getElementById("updated").textContent = `updated ${when(data.at)}`;
  document.getElementById("who").textContent = `signed in as ${data.user}${can ? "" : " (read only)"}`;
  document.getElementById("workers-count").textContent = `(${data.workers.length})`;
  document.getElementById("tasks-count").textContent = `(${data.tasks.length})`;
  document.getElementById("queues-count").textContent = `(${data.queues.length})`;
  document.getElementById("dead-letters-count").textContent = `(${data.dead_letter_count})`;
  fill("workers", data.workers.map((w) => workerRow(w, can)), 10, "no live workers");
  fill("tasks", data.tasks.map(taskRow), 6, "nothing running");
  fill("queues", data.queues.map(queueRow), 6, "no queues");
  fill("dead-letters", data.dead_letters.slice().reverse().map((d) => deadLetterRow(d, can)), 7, "no dead letters");
  fill("events", data.events.map(eventRow), 3, "nothing happened lately");
  const purge = document.getElementById("purge");
  purge.hidden = !can || !data.dead_letter_count;
}

// Every REFRESH_MS while the page is visible; at once when it becomes visible again.
async function refresh({ periodic = false } = {}) {
  clearTimeout(timer);
  if (!inFlight && !(periodic && document.hidden)) {
    inFlight = true;
    try {
      render(await request("GET", "api/fleet"));
      document.body.dataset.loaded = "true";
      showError("");
    } catch (error) {
      showError(error.message);
    } finally {
      inFlight = false;
    }
  }
  timer = setTimeout(() => refresh({ periodic: true }), REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("purge").addEventListener("click", async (e) => {
    const count = document.getElementById("dead-letters-count").textContent;
    const ok = await confirmDialog(`Delete every dead letter ${count}? This cannot be undone.`, { okText: "Purge" });
    if (ok !== null) act("api/dead-letters/purge", { confirm: true }, e.target, (r) => `purged ${r.purged} dead letter(s)`);
  });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  refresh();
});
