// The runs page: a filtered, paged table of runs, re-read every few seconds while it is shown.
import { api, el, fill, formatDuration, formatTime, labelChips, runLink, statusBadge, toDate } from "./dom.js";

const STATUSES = ["running", "completed", "failed", "canceled"];
const TEXT_FILTERS = [
  ["pipeline", "pipeline", "pipeline id"],
  ["label", "labels", "team=billing, env=prod"],
  ["since", "started after", "1h or 2026-12-04T18:00Z"],
  ["before", "started before", "10m or 2026-12-05T09:00Z"],
  ["min_duration", "lasted at least", "90s, 5m, 1.5h"],
  ["max_duration", "lasted at most", "1h, 2d"],
  ["parent", "parent run", "run id: its children"],
];

export async function renderRuns(root, info) {
  const params = new URLSearchParams(window.location.search);
  const form = filterForm(params);
  const error = el("p", { id: "runs-error", class: "error", hidden: true });
  const body = el("tbody", { id: "runs-body" });
  const table = el("table", { class: "runs", id: "runs-table" },
    el("thead", {}, el("tr", {}, ["run", "status", "pipeline", "labels", "started", "duration", "parent"].map((h) => el("th", {}, h)))),
    body);
  const prev = el("button", { id: "page-prev", type: "button", disabled: true }, "◀ newer");
  const next = el("button", { id: "page-next", type: "button", disabled: true }, "older ▶");
  const pageInfo = el("span", { id: "page-info", class: "muted" });
  const updated = el("span", { id: "updated", class: "muted" });
  fill(root,
    el("section", { class: "card" }, el("h1", {}, "Runs"), form, error),
    el("section", { class: "card" }, table, el("div", { class: "pager" }, prev, pageInfo, next, updated)),
  );

  const tokens = [null]; // page_token of each page seen, the current one last
  let loading = false;
  let latest = [];

  async function load() {
    if (loading) return;
    loading = true;
    try {
      const query = new URLSearchParams(window.location.search);
      const token = tokens[tokens.length - 1];
      if (token) query.set("page_token", token);
      const page = await api(`/api/runs?${query}`);
      latest = page.runs;
      error.hidden = true;
      fill(body, ...(latest.length ? latest.map(row) : [emptyRow()]));
      next.disabled = !page.next_page_token;
      next.dataset.token = page.next_page_token || "";
      prev.disabled = tokens.length <= 1;
      pageInfo.textContent = `page ${tokens.length}`;
      updated.textContent = `live · updated ${formatTime(new Date())}`;
    } catch (failure) {
      error.textContent = failure.message;
      error.hidden = false;
      fill(body);
    } finally {
      loading = false;
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const query = formQuery(form);
    window.history.replaceState(null, "", `/runs${query.toString() ? `?${query}` : ""}`);
    tokens.splice(1);
    load();
  });
  form.addEventListener("change", (event) => {
    if (event.target.type === "checkbox" || event.target.tagName === "SELECT") form.requestSubmit();
  });
  next.addEventListener("click", () => { tokens.push(next.dataset.token); load(); });
  prev.addEventListener("click", () => { tokens.pop(); load(); });

  await load();
  window.setInterval(() => { if (!document.hidden) load(); }, info.refresh_seconds * 1000);
  window.setInterval(() => tickDurations(body), 1000);
}

function filterForm(params) {
  const wanted = new Set(params.getAll("status").flatMap((s) => s.split(",")));
  const statuses = el("fieldset", { class: "statuses" }, el("legend", {}, "status"),
    STATUSES.map((status) => el("label", {},
      el("input", { type: "checkbox", name: "status", value: status, checked: wanted.has(status) }), statusBadge(status))));
  const texts = TEXT_FILTERS.map(([name, label, placeholder]) => el("label", {}, label,
    el("input", { type: "text", name, placeholder, value: params.getAll(name).join(", ") })));
  const lineage = el("label", {}, "lineage", el("select", { name: "lineage" },
    [["all", "all runs"], ["top", "top-level"], ["children", "children"]].map(([value, text]) =>
      el("option", { value, selected: (params.get("lineage") || "all") === value }, text))));
  const size = el("label", {}, "per page", el("select", { name: "page_size" },
    ["10", "25", "50", "100"].map((n) => el("option", { value: n, selected: (params.get("page_size") || "25") === n }, n))));
  return el("form", { id: "filters", class: "filters" }, statuses, texts, lineage, size,
    el("button", { type: "submit", id: "apply" }, "Apply"));
}

function formQuery(form) {
  const query = new URLSearchParams();
  for (const [name, value] of new FormData(form)) {
    const text = String(value).trim();
    if (!text || (name === "lineage" && text === "all") || (name === "page_size" && text === "25")) continue;
    query.append(name, text);
  }
  return query;
}

function row(run) {
  const started = toDate(run.created_at);
  const running = run.status === "running";
  const ended = running ? null : toDate(run.updated_at);
  const duration = el("td", { class: "duration", "data-started": running && started ? started.toISOString() : null },
    started ? formatDuration((ended || new Date()) - started) : "");
  return el("tr", { "data-run-id": run.run_id, "data-status": run.status },
    el("td", {}, runLink(run.run_id)),
    el("td", {}, statusBadge(run.status)),
    el("td", { class: "pipeline" }, run.pipeline_id),
    el("td", {}, labelChips(run.labels)),
    el("td", { class: "started" }, formatTime(started)),
    duration,
    el("td", {}, run.parent_run_id ? runLink(run.parent_run_id) : ""));
}

function emptyRow() {
  return el("tr", { class: "empty" }, el("td", { colspan: 7, class: "muted" }, "No runs match these filters."));
}

function tickDurations(body) {
  for (const cell of body.querySelectorAll("td[data-started]")) {
    cell.textContent = formatDuration(new Date() - new Date(cell.dataset.started));
  }
}
