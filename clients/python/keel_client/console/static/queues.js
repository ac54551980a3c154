// The queues page: each task queue's backlog, running tasks and the workers seen polling it, re-read
// every few seconds while it is shown (WorkerService.ListQueues).
import { api, el, fill, formatTime, toDate } from "./dom.js";

export async function renderQueues(root, info) {
  const body = el("tbody", { id: "queues-body" });
  const error = el("p", { id: "queues-error", class: "error", hidden: true });
  const updated = el("span", { id: "updated", class: "muted" });
  fill(root, el("section", { class: "card" }, el("h1", {}, "Task queues"),
    el("p", { class: "muted" }, "Steps with a task_queue run on workers; a queue is listed while it has tasks or workers seen in the last minute."),
    error,
    el("table", { id: "queues-table" },
      el("thead", {}, el("tr", {}, ["queue", "backlog", "running", "workers", "last seen", "ops"].map((h) => el("th", {}, h)))),
      body),
    el("div", { class: "pager" }, updated)));

  let loading = false;
  async function load() {
    if (loading) return;
    loading = true;
    try {
      const { queues } = await api("/api/queues");
      error.hidden = true;
      fill(body, ...(queues.length ? queues.flatMap(rows) : [el("tr", { class: "empty" }, el("td", { colspan: 6, class: "muted" }, "No queue has tasks or workers."))]));
      updated.textContent = `live · updated ${formatTime(new Date())}`;
    } catch (failure) {
      error.textContent = failure.message;
      error.hidden = false;
    } finally {
      loading = false;
    }
  }
  await load();
  window.setInterval(() => { if (!document.hidden) load(); }, info.refresh_seconds * 1000);
}

// One row per worker (the queue's own cells on the first), or one row for a queue without workers.
function rows(queue) {
  const workers = queue.workers.length ? queue.workers : [null];
  return workers.map((worker, index) => el("tr", { "data-queue": queue.task_queue, "data-worker-id": worker ? worker.worker_id : null },
    index === 0 ? el("td", { class: "mono", rowspan: workers.length }, queue.task_queue) : null,
    index === 0 ? el("td", { class: "backlog", rowspan: workers.length }, String(queue.backlog)) : null,
    index === 0 ? el("td", { class: "running", rowspan: workers.length }, String(queue.running)) : null,
    el("td", { class: "mono worker" }, worker ? worker.worker_id : el("span", { class: "muted" }, "none seen")),
    el("td", {}, worker ? formatTime(toDate(worker.last_seen)) : ""),
    el("td", {}, worker ? worker.ops.map((op) => el("span", { class: "chip" }, op)) : "")));
}
