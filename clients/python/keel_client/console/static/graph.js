// The run page's pictures, drawn as SVG: the DAG of steps, and the Gantt chart of their attempts.
import { formatDuration, svg, toDate } from "./dom.js";

const NODE_W = 190;
const NODE_H = 46;
const GAP_X = 56;
const GAP_Y = 14;

// Each step's column: 0 for a step without dependencies, else one past its deepest dependency.
export function layers(steps) {
  const byId = new Map(steps.map((s) => [s.step_id, s]));
  const depth = new Map();
  const visit = (id, seen) => {
    if (depth.has(id)) return depth.get(id);
    if (seen.has(id)) return 0; // a cycle cannot start; draw it flat rather than loop
    seen.add(id);
    const deps = (byId.get(id).depends_on || []).filter((d) => byId.has(d));
    const d = deps.length ? 1 + Math.max(...deps.map((dep) => visit(dep, seen))) : 0;
    depth.set(id, d);
    return d;
  };
  for (const step of steps) visit(step.step_id, new Set());
  return depth;
}

// The waits of parked attempts, from the run's `StepWaiting` and `SignalAwaited` events: "step#attempt" -> what it waits
// for (`kind`: timer, signal, ...), since when, until when (timers) and the kind's details.
export function waitsOf(events) {
  const waits = new Map();
  for (const event of events) {
    if (event.type === "SignalAwaited") {
      const { step_id: stepId, attempt, name, deadline_us: deadline, at_us: at } = event.data;
      waits.set(`${stepId}#${attempt}`, {
        kind: "signal",
        since: at ? new Date(at / 1000) : toDate(event.recorded_at),
        until: deadline ? new Date(deadline / 1000) : null,
        detail: { name },
      });
      continue;
    }
    if (event.type !== "StepWaiting") continue;
    const { step_id: stepId, attempt, wait = {} } = event.data;
    waits.set(`${stepId}#${attempt}`, {
      kind: wait.kind || "wait",
      since: event.data.at_us ? new Date(event.data.at_us / 1000) : toDate(event.recorded_at),
      until: wait.until_us ? new Date(wait.until_us / 1000) : null,
      detail: wait.detail || null,
    });
  }
  return waits;
}

// A step's state as the page shows it: `waiting` while its open attempt is parked or waits for a signal.
export function shownStatus(step, waits) {
  if (step.status === "running" && step.waiting_for_signal) return "waiting";
  const last = step.attempts[step.attempts.length - 1];
  if (step.status === "running" && last && !last.finished_at && waits.has(`${step.step_id}#${last.attempt}`)) {
    return "waiting";
  }
  return step.status;
}

export function waitText(wait) {
  const what = wait.detail && wait.detail.name ? `${wait.kind} ${wait.detail.name}` : wait.kind;
  return `waiting for ${what}${wait.until ? ` until ${wait.until.toLocaleTimeString()}` : ""}`;
}

export function drawDag(steps, waits = new Map()) {
  const depth = layers(steps);
  const columns = [];
  for (const step of steps) {
    const d = depth.get(step.step_id);
    (columns[d] ||= []).push(step);
  }
  const place = new Map();
  columns.forEach((column, c) => column.forEach((step, r) => {
    place.set(step.step_id, { x: 8 + c * (NODE_W + GAP_X), y: 8 + r * (NODE_H + GAP_Y) });
  }));
  const rows = Math.max(1, ...columns.map((c) => c.length));
  const width = 16 + columns.length * NODE_W + Math.max(0, columns.length - 1) * GAP_X;
  const height = 16 + rows * NODE_H + (rows - 1) * GAP_Y;
  const picture = svg("svg", { id: "dag-svg", class: "dag", width, height, viewBox: `0 0 ${width} ${height}` });
  for (const step of steps) {
    const to = place.get(step.step_id);
    for (const dep of step.depends_on || []) {
      const from = place.get(dep);
      if (!from) continue;
      const x1 = from.x + NODE_W, y1 = from.y + NODE_H / 2, x2 = to.x, y2 = to.y + NODE_H / 2;
      const mid = (x1 + x2) / 2;
      picture.append(svg("path", { class: "edge", d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2 - 4},${y2}` }));
      picture.append(svg("path", { class: "arrow", d: `M${x2 - 7},${y2 - 4} L${x2},${y2} L${x2 - 7},${y2 + 4}` }));
    }
  }
  for (const step of steps) {
    const { x, y } = place.get(step.step_id);
    const tries = step.attempts.length;
    const status = shownStatus(step, waits);
    const title = svg("title", {}, `${step.step_id}: ${status}${step.last_error ? ` (${step.last_error.code}: ${step.last_error.message})` : ""}`);
    const reused = step.reused_from_run_id ? " reused" : "";
    picture.append(svg("g", { class: `node status-${status}${reused}`, "data-step-id": step.step_id, "data-status": status, "data-reused": reused ? "1" : null },
      title,
      svg("rect", { x, y, width: NODE_W, height: NODE_H, rx: 7 }),
      svg("text", { x: x + 10, y: y + 19, class: "node-id" }, clip(step.step_id, 20)),
      svg("text", { x: x + 10, y: y + 36, class: "node-sub" },
        `${clip(step.op_id, 16)} · ${reused ? "reused" : status}${tries > 1 ? ` · ${tries}×` : ""}`)));
  }
  return picture;
}

function clip(text, n) {
  return text.length > n ? `${text.slice(0, n - 1)}…` : text;
}

const LABEL_W = 150;
const CHART_W = 760;
const ROW_H = 24;
const AXIS_H = 22;

// One row per step: a bar per attempt (failed, completed, running), and the waits between them.
export function drawTimeline(run, now, waits = new Map()) {
  const start = toDate(run.created_at) || now;
  const times = [start.getTime()];
  for (const step of run.steps) {
    for (const a of step.attempts) {
      if (a.started_at) times.push(toDate(a.started_at).getTime());
      if (a.finished_at) times.push(toDate(a.finished_at).getTime());
    }
  }
  const terminal = toDate(run.completed_at);
  times.push(terminal ? terminal.getTime() : now.getTime());
  const t0 = start.getTime();
  const span = Math.max(1, Math.max(...times) - t0);
  const scale = (t) => LABEL_W + ((t - t0) / span) * CHART_W;
  const height = AXIS_H + run.steps.length * ROW_H + 6;
  const width = LABEL_W + CHART_W + 12;
  const picture = svg("svg", { id: "timeline-svg", class: "timeline", width, height, viewBox: `0 0 ${width} ${height}` });
  for (let i = 0; i <= 4; i += 1) {
    const x = LABEL_W + (CHART_W * i) / 4;
    picture.append(svg("line", { class: "tick", x1: x, x2: x, y1: AXIS_H - 4, y2: height }));
    picture.append(svg("text", { class: "tick-label", x, y: 12, "text-anchor": i === 4 ? "end" : "middle" },
      `+${formatDuration((span * i) / 4)}`));
  }
  run.steps.forEach((step, row) => {
    const y = AXIS_H + row * ROW_H;
    picture.append(svg("text", { class: "row-label", x: 4, y: y + 16 }, clip(step.step_id, 20)));
    if (step.reused_from_run_id) {
      picture.append(svg("text", { class: "tick-label", x: LABEL_W + 4, y: y + 16 }, `reused from run ${step.reused_from_run_id.slice(0, 8)}`));
    }
    let previousEnd = null;
    for (const attempt of step.attempts) {
      const began = toDate(attempt.started_at);
      if (!began) continue;
      if (previousEnd !== null && began.getTime() > previousEnd) {
        picture.append(waitBar(scale(previousEnd), scale(began.getTime()), y, `waited ${formatDuration(began.getTime() - previousEnd)} before attempt ${attempt.attempt}`));
      }
      const ended = toDate(attempt.finished_at);
      const endTime = ended ? ended.getTime() : (terminal ? terminal.getTime() : now.getTime());
      const x1 = scale(began.getTime());
      const w = Math.max(3, scale(endTime) - x1);
      const error = attempt.error ? ` · ${attempt.error.code}: ${attempt.error.message}` : "";
      const where = attempt.task_queue ? ` · on ${attempt.worker_id || "no worker yet"} (queue ${attempt.task_queue})` : "";
      picture.append(svg("g", { class: `bar attempt-${attempt.status}`, "data-step-id": step.step_id, "data-attempt": attempt.attempt, "data-status": attempt.status },
        svg("title", {}, `${step.step_id} attempt ${attempt.attempt}: ${attempt.status}, ${formatDuration(endTime - began.getTime())}${where}${error}`),
        svg("rect", { x: x1, y: y + 4, width: w, height: ROW_H - 8, rx: 3 }),
        w > 26 ? svg("text", { x: x1 + 4, y: y + 16, class: "bar-label" }, `#${attempt.attempt}`) : null));
      // A parked attempt: the stretch it spent waiting (timer, signal, ...), over its bar.
      const wait = waits.get(`${step.step_id}#${attempt.attempt}`);
      if (wait && wait.since) {
        const from = Math.max(scale(wait.since.getTime()), x1);
        picture.append(svg("g", { class: "bar parked", "data-step-id": step.step_id, "data-attempt": attempt.attempt, "data-kind": wait.kind },
          svg("title", {}, `${step.step_id} attempt ${attempt.attempt}: ${waitText(wait)}`),
          svg("rect", { x: from, y: y + 4, width: Math.max(3, scale(endTime) - from), height: ROW_H - 8, rx: 3 })));
      }
      previousEnd = ended ? ended.getTime() : null;
    }
    // A failed attempt that will be retried: the wait for the next attempt, up to now.
    if (previousEnd !== null && step.status === "retrying" && !terminal) {
      picture.append(waitBar(scale(previousEnd), scale(now.getTime()), y, "waiting to retry"));
    }
  });
  return picture;
}

function waitBar(x1, x2, y, title) {
  return svg("g", { class: "bar wait" }, svg("title", {}, title),
    svg("rect", { x: x1, y: y + 8, width: Math.max(2, x2 - x1), height: ROW_H - 16 }));
}
