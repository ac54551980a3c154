// Small helpers shared by the pages: building elements, calling the console's API, showing times.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
  append(node, children);
  return node;
}

// Replace a node's children; null, undefined and false are left out (as in `el`).
export function fill(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// GET (or POST with `body`) an API path; an answer that is not 2xx throws ApiError with the engine's reason.
export async function api(path, body) {
  const init = body === undefined
    ? { headers: { accept: "application/json" } }
    : {
        method: "POST",
        headers: { "content-type": "application/json", "x-keel-console": "1" },
        body: JSON.stringify(body),
      };
  const response = await fetch(path, init);
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiError(response.status, error.code || `http_${response.status}`, error.message || response.statusText);
  }
  return data;
}

export function statusBadge(status) {
  return el("span", { class: `badge status-${status}`, "data-status": status }, status);
}

export function labelChips(labels) {
  const entries = Object.entries(labels || {}).sort(([a], [b]) => a.localeCompare(b));
  return el("span", { class: "labels" }, entries.map(([k, v]) => el("span", { class: "chip" }, `${k}=${v}`)));
}

export function runLink(runId, text) {
  return el("a", { href: `/runs/${encodeURIComponent(runId)}`, class: "mono", title: runId }, text || runId.slice(0, 8));
}

export function toDate(text) {
  return text ? new Date(text) : null;
}

const pad = (n, width = 2) => String(n).padStart(width, "0");

// A time as the operator reads it: local date and time to the second.
export function formatTime(date) {
  if (!date) return "";
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ` +
    `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

export function formatDuration(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return "";
  if (ms < 1000) return `${Math.max(0, Math.round(ms))} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} m ${pad(Math.floor(s % 60))} s`;
  const h = Math.floor(m / 60);
  return `${h} h ${pad(m % 60)} m`;
}

export function jsonBlock(value, cls = "json") {
  return el("pre", { class: cls }, JSON.stringify(value, null, 2));
}

// A <details> block; `key` names it so that a redraw can keep it open (see openKeys).
export function collapsible(summary, content, open = false, key = null) {
  return el("details", { open, "data-key": key }, el("summary", {}, summary), content);
}

// The keys of the open <details> blocks under `node`, to pass back when redrawing it.
export function openKeys(node) {
  return new Set([...node.querySelectorAll("details[open][data-key]")].map((d) => d.dataset.key));
}
