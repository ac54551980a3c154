// The console's entry point: reads what the engine offers, then shows the page the URL names.
import { api, el, fill } from "./dom.js";
import { renderRuns } from "./runs.js";
import { renderQueues } from "./queues.js";
import { renderRun } from "./run.js";

async function main() {
  const root = document.getElementById("app");
  let info;
  try {
    info = await api("/api/info");
  } catch (error) {
    fill(root, el("p", { class: "error" }, `The console cannot reach its server: ${error.message}`));
    return;
  }
  document.getElementById("engine").textContent = `engine ${info.engine}`;
  if (info.actions.includes("queues")) {
    document.getElementById("nav").append(el("a", { href: "/queues", "data-nav": "queues" }, "Queues"));
  }
  const path = window.location.pathname.replace(/\/+$/, "");
  const match = path.match(/^\/runs\/([^/]+)$/);
  if (match) {
    document.title = `Run ${decodeURIComponent(match[1]).slice(0, 8)} · Keel`;
    await renderRun(root, decodeURIComponent(match[1]), info);
  } else if (path === "/queues" && info.actions.includes("queues")) {
    document.title = "Queues · Keel";
    document.querySelector('[data-nav="queues"]').classList.add("current");
    await renderQueues(root, info);
  } else {
    document.title = "Runs · Keel";
    document.querySelector('[data-nav="runs"]').classList.add("current");
    await renderRuns(root, info);
  }
}

main();
