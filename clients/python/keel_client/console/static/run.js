// A run's page: header, actions, DAG, timeline, steps (outputs and facts), children, input, result,
// failure ledger and events. It follows the run live: WatchRun's events arrive as Server-Sent
// Events, and each one makes the page re-read the run (at most one read in flight).
import {
  ApiError, api, collapsible, el, fill, formatDuration, formatTime, jsonBlock, labelChips, openKeys, runLink, statusBadge, toDate,
} from "./dom.js";
import { drawDag, drawTimeline, shownStatus, waitText, waitsOf } from "./graph.js";

const TERMINAL = new Set(["completed", "failed", "canceled"]);

export async function renderRun(root, runId, info) {
  const page = new RunPage(root, runId, info);
  await page.start();
}

class RunPage {
  constructor(root, runId, info) {
    this.root = root;
    this.runId = runId;
    this.info = info;
    this.run = null;
    this.events = [];
    this.reading = null;
    this.again = false;
    this.treeReadAt = 0;
    this.sections = {};
    for (const name of ["header", "actions", "dag", "timeline", "steps", "children", "input", "result", "ledger", "events"]) {
      this.sections[name] = el("section", { class: "card", id: name });
    }
    this.eventsBody = el("tbody", { id: "events-body" });
    this.live = el("span", { id: "live", class: "muted" }, "");
  }

  async start() {
    try {
      this.run = (await api(`/api/runs/${encodeURIComponent(this.runId)}`)).run;
    } catch (error) {
      const text = error instanceof ApiError && error.status === 404 ? `No run ${this.runId}.` : error.message;
      fill(this.root, el("p", { class: "error", id: "run-error" }, text));
      return;
    }
    fill(this.root, ...Object.values(this.sections));
    fill(this.sections.events, el("h2", {}, "Events ", this.live),
      el("table", { class: "events" }, el("thead", {}, el("tr", {}, ["seq", "type", "recorded", "data"].map((h) => el("th", {}, h)))), this.eventsBody));
    this.renderActions();
    this.draw();
    this.readTree(true);
    this.follow();
    window.setInterval(() => {
      if (this.run && !TERMINAL.has(this.run.status)) this.drawTimeline();
    }, 1000);
  }

  follow() {
    const source = new EventSource(`/api/runs/${encodeURIComponent(this.runId)}/events`);
    this.live.textContent = "· live";
    source.onmessage = (message) => {
      const event = JSON.parse(message.data);
      this.events.push(event);
      this.eventsBody.append(eventRow(event));
      this.refresh();
    };
    source.addEventListener("end", async () => {
      source.close();
      await this.refresh();
      this.live.textContent = "· ended";
    });
    source.addEventListener("failure", (message) => {
      source.close();
      const failure = JSON.parse(message.data);
      this.live.textContent = `· not live: ${failure.code}: ${failure.message}`;
    });
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) this.live.textContent = "· disconnected (reload to follow)";
    };
  }

  // Re-read the run; calls that come while a read is in flight make one more read after it, and
  // every caller's promise settles once the page shows a run read after its call.
  refresh() {
    if (this.reading) {
      this.again = true;
      return this.reading;
    }
    this.reading = (async () => {
      do {
        this.again = false;
        try {
          this.run = (await api(`/api/runs/${encodeURIComponent(this.runId)}`)).run;
          this.draw();
          await this.readTree(TERMINAL.has(this.run.status));
        } catch (error) {
          this.showResult(`Could not re-read the run: ${error.message}`, true);
        }
      } while (this.again);
      this.reading = null;
    })();
    return this.reading;
  }

  async readTree(force) {
    const now = Date.now();
    if (!this.run.children.length) {
      fill(this.sections.children, el("h2", {}, "Children"), el("p", { class: "muted" }, "No child runs."));
      return;
    }
    if (!force && now - this.treeReadAt < 2000) return;
    this.treeReadAt = now;
    try {
      const { tree } = await api(`/api/runs/${encodeURIComponent(this.runId)}/tree`);
      fill(this.sections.children, el("h2", {}, "Children ",
        el("a", { id: "children-list", class: "small", href: `/runs?parent=${encodeURIComponent(this.runId)}` }, "(list them)")),
        el("ul", { class: "tree", id: "children-tree" }, tree.children.map(treeItem)),
        tree.truncated ? el("p", { class: "muted" }, "Deeper or further children are not shown; open a child to see its own.") : null);
    } catch (error) {
      fill(this.sections.children, el("h2", {}, "Children"), el("p", { class: "error" }, error.message));
    }
  }

  draw() {
    this.drawHeader();
    this.updateActions();
    const run = this.run;
    fill(this.sections.dag, el("h2", {}, "Steps"), el("div", { class: "scroll" }, drawDag(run.steps, waitsOf(this.events))));
    this.drawTimeline();
    this.drawSteps();
    fill(this.sections.input, el("h2", {}, "Input"), jsonBlock(run.input, "json input"));
    this.drawResult();
    this.drawLedger();
  }

  drawHeader() {
    const run = this.run;
    const started = toDate(run.created_at);
    const ended = toDate(run.completed_at);
    const facts = [
      ["pipeline", el("span", { id: "run-pipeline" }, run.op_id)],
      ["status", el("span", { id: "run-status" }, statusBadge(run.status))],
      ["started", formatTime(started)],
      ["ended", formatTime(ended)],
      ["duration", started ? formatDuration((ended || new Date()) - started) : ""],
      ["parent", run.parent_run_id ? el("span", {}, runLink(run.parent_run_id), run.parent_fact_key ? ` (${run.parent_fact_key})` : "") : "—"],
      ["labels", labelChips(run.labels)],
      run.rerun_of_run_id
        ? ["rerun of", el("span", { id: "rerun-of" }, runLink(run.rerun_of_run_id), ` from step ${run.rerun_from_step_id}`)]
        : null,
      (run.reruns || []).length ? ["reruns", el("span", { id: "reruns" }, run.reruns.map((id) => runLink(id)))] : null,
      ["events", String(run.head_seq)],
      ["manifest", el("span", { class: "mono small" }, run.manifest_id)],
    ];
    fill(this.sections.header,
      el("h1", {}, "Run ", el("span", { class: "mono" }, run.run_id)),
      el("dl", { class: "facts" }, facts.filter(Boolean).flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
      run.reason ? el("p", { class: "reason" }, `reason: ${run.reason}`) : null,
      run.error ? el("p", { class: "error" }, `${run.error.code}: ${run.error.message}`) : null);
  }

  renderActions() {
    const actions = new Set(this.info.actions);
    const reason = el("input", { type: "text", id: "cancel-reason", placeholder: "reason (optional)" });
    const confirm = el("span", { id: "cancel-confirm-row", hidden: true }, reason,
      el("button", { type: "button", id: "cancel-confirm", class: "danger", onclick: () => this.act("cancel", { reason: reason.value }) }, "Confirm cancel"),
      el("button", { type: "button", onclick: () => { confirm.hidden = true; } }, "Keep running"));
    this.cancelButton = el("button", { type: "button", id: "cancel", class: "danger", onclick: () => { confirm.hidden = false; reason.focus(); } }, "Cancel run…");
    const target = el("select", { id: "terminalize-target" }, ["canceled", "failed", "completed"].map((t) => el("option", { value: t }, t)));
    const why = el("input", { type: "text", id: "terminalize-reason", placeholder: "reason (required for failed)" });
    this.terminalizeButton = el("button", { type: "button", id: "terminalize" }, "Terminalize");
    this.terminalizeButton.addEventListener("click", () => this.act("terminalize", { target: target.value, reason: why.value }));
    this.rerunStep = el("select", { id: "rerun-step" });
    this.rerunButton = el("button", { type: "button", id: "rerun" }, "Rerun");
    this.rerunButton.addEventListener("click", () => this.rerun());
    this.signalName = el("input", { type: "text", id: "signal-name", placeholder: "signal name" });
    this.signalPayload = el("textarea", { id: "signal-payload", rows: 2, cols: 40, placeholder: 'payload as JSON, e.g. {"approved": true}' });
    this.signalId = el("input", { type: "text", id: "signal-id", placeholder: "signal id (optional)" });
    this.signalButton = el("button", { type: "button", id: "signal-send" }, "Send signal");
    this.signalButton.addEventListener("click", () => this.sendSignal());
    this.actionResult = el("p", { id: "action-result", hidden: true });
    fill(this.sections.actions, el("h2", {}, "Actions"),
      actions.has("cancel") ? el("div", { class: "action" }, this.cancelButton, confirm) : null,
      actions.has("terminalize") ? el("div", { class: "action" }, "terminalize as ", target, why, this.terminalizeButton) : null,
      actions.has("signal")
        ? el("div", { class: "action" }, "send signal ", this.signalName, this.signalPayload, this.signalId, this.signalButton)
        : null,
      actions.has("rerun")
        ? el("div", { class: "action" }, "rerun from step ", this.rerunStep, this.rerunButton,
          el("span", { class: "muted" }, "a new run executes this step and those depending on it, and reuses the others (once this run ended)"))
        : null,
      this.actionResult);
  }

  updateActions() {
    const done = TERMINAL.has(this.run.status);
    for (const button of [this.cancelButton, this.terminalizeButton]) button.disabled = done;
    if (done) document.getElementById("cancel-confirm-row").hidden = true;
    this.rerunButton.disabled = !done;
    this.signalButton.disabled = done;
    // Offer the signal a step waits for, unless the operator typed a name already.
    const waiting = this.run.steps.find((step) => step.waiting_for_signal);
    if (waiting && !this.signalName.value) this.signalName.value = waiting.waiting_for_signal.name;
    const chosen = this.rerunStep.value;
    const failed = this.run.steps.find((step) => step.status === "failed");
    fill(this.rerunStep, ...this.run.steps.map((step) => el("option", { value: step.step_id }, step.step_id)));
    this.rerunStep.value = chosen || (failed ? failed.step_id : this.run.steps.length ? this.run.steps[0].step_id : "");
  }

  async sendSignal() {
    let payload = null;
    const text = this.signalPayload.value.trim();
    if (text) {
      try {
        payload = JSON.parse(text);
      } catch (error) {
        this.showResult(`signal not sent: the payload is not JSON (${error.message})`, true);
        return;
      }
    }
    const body = { name: this.signalName.value.trim(), payload, signal_id: this.signalId.value.trim() || null };
    try {
      const sent = await api(`/api/runs/${encodeURIComponent(this.runId)}/signal`, body);
      this.showResult(sent.created
        ? `signal ${body.name} sent (id ${sent.signal_id}, inbox #${sent.inbox_seq})`
        : `signal ${sent.signal_id} was delivered already: nothing sent`, false);
    } catch (error) {
      this.showResult(`signal failed: ${error.code}: ${error.message}`, true);
    }
  }

  async rerun() {
    try {
      const result = await api(`/api/runs/${encodeURIComponent(this.runId)}/rerun`, { from_step_id: this.rerunStep.value });
      window.location.assign(`/runs/${encodeURIComponent(result.run_id)}`);
    } catch (error) {
      this.showResult(`rerun failed: ${error.code}: ${error.message}`, true);
    }
  }

  async act(action, body) {
    try {
      const result = await api(`/api/runs/${encodeURIComponent(this.runId)}/${action}`, body);
      this.showResult(`${action}: ${result.outcome} (run ${result.status})`, false);
    } catch (error) {
      this.showResult(`${action} failed: ${error.code}: ${error.message}`, true);
    }
    this.refresh();
  }

  showResult(text, isError) {
    this.actionResult.textContent = text;
    this.actionResult.className = isError ? "error" : "ok";
    this.actionResult.hidden = false;
  }

  drawTimeline() {
    fill(this.sections.timeline, el("h2", {}, "Timeline"),
      el("p", { class: "legend muted" }, legend("completed"), legend("failed"), legend("running"), legend("parked"), legend("wait"), " one bar per attempt; parked: the attempt waits (a timer, a signal); hatched: backoff before a retry"),
      el("div", { class: "scroll" }, drawTimeline(this.run, new Date(), waitsOf(this.events))));
  }

  drawSteps() {
    const open = openKeys(this.sections.steps);
    const waits = waitsOf(this.events);
    const facts = new Map();
    for (const event of this.events) {
      if (event.type !== "FactRecorded") continue;
      const list = facts.get(event.data.step_id) || [];
      list.push(event.data);
      facts.set(event.data.step_id, list);
    }
    const rows = this.run.steps.map((step) => {
      const stepFacts = facts.get(step.step_id) || [];
      const status = shownStatus(step, waits);
      const last = step.attempts[step.attempts.length - 1];
      const signal = step.waiting_for_signal;
      const wait = status !== "waiting" ? null : waits.get(`${step.step_id}#${last.attempt}`)
        || (signal ? { kind: "signal", detail: { name: signal.name }, until: toDate(signal.timeout_at) } : null);
      return el("tr", { "data-step-id": step.step_id, "data-status": status },
        el("td", { class: "mono" }, step.step_id),
        el("td", {}, step.op_id, step.op_version ? el("span", { class: "muted" }, ` v${step.op_version}`) : ""),
        el("td", { class: "status-cell" }, statusBadge(status),
          wait ? el("span", { class: "wait-text muted" }, ` ${waitText(wait)}`) : "",
          step.reused_from_run_id ? el("span", { class: "reused" }, " reused from ", runLink(step.reused_from_run_id)) : ""),
        el("td", {}, String(step.attempts.length)),
        el("td", { class: "mono small" }, ranOn(step)),
        el("td", {}, (step.depends_on || []).join(", ")),
        el("td", { class: "output" }, step.has_output ? collapsible("output", jsonBlock(step.output), open.has(`out:${step.step_id}`), `out:${step.step_id}`) : ""),
        el("td", { class: "facts-cell" }, stepFacts.length
          ? collapsible(`${stepFacts.length} fact${stepFacts.length > 1 ? "s" : ""}`,
            el("ul", { class: "fact-list" }, stepFacts.map((f) => el("li", {},
              el("span", { class: "mono" }, f.fact_key), ` (${f.namespace}, attempt ${f.attempt})`, jsonBlock(f.response)))),
            open.has(`facts:${step.step_id}`), `facts:${step.step_id}`)
          : ""),
        el("td", { class: "error-cell" }, step.last_error ? `${step.last_error.code}: ${step.last_error.message}` : ""));
    });
    fill(this.sections.steps, el("h2", {}, "Step details"),
      el("table", { class: "steps", id: "steps-table" },
        el("thead", {}, el("tr", {}, ["step", "op", "status", "attempts", "ran on", "depends on", "output", "recorded facts", "last error"].map((h) => el("th", {}, h)))),
        el("tbody", {}, rows)));
  }

  drawResult() {
    const run = this.run;
    fill(this.sections.result, el("h2", {}, "Result"),
      TERMINAL.has(run.status) ? jsonBlock(run.final_snapshot, "json result") : el("p", { class: "muted" }, "The run has not ended."));
  }

  drawLedger() {
    const ledger = this.run.failure_ledger;
    fill(this.sections.ledger, el("h2", {}, "Failure ledger"),
      ledger.length
        ? el("table", { id: "ledger-table" }, el("thead", {}, el("tr", {}, ["step", "reason", "recorded"].map((h) => el("th", {}, h)))),
          el("tbody", {}, ledger.map((e) => el("tr", {}, el("td", {}, e.step_id), el("td", {}, e.reason), el("td", {}, formatTime(toDate(e.recorded_at)))))))
        : el("p", { class: "muted" }, "Empty: the engine recorded no divergence for this run."));
  }
}

// Where the step's last attempt ran: a worker of its task queue, or the engine itself.
function ranOn(step) {
  const last = step.attempts[step.attempts.length - 1];
  if (!last || !last.task_queue) return step.task_queue ? `queue ${step.task_queue}` : "";
  return last.worker_id ? `${last.worker_id} @ ${last.task_queue}` : `queue ${last.task_queue}`;
}

function legend(kind) {
  return el("span", { class: `key key-${kind}` }, kind);
}

function treeItem(node) {
  return el("li", { "data-run-id": node.run_id, "data-status": node.status },
    statusBadge(node.status), " ", node.status === "pending" ? el("span", { class: "mono" }, node.run_id.slice(0, 8)) : runLink(node.run_id),
    " ", el("span", {}, node.op_id), node.fact_key ? el("span", { class: "muted" }, ` · ${node.fact_key}`) : "",
    node.children.length ? el("ul", {}, node.children.map(treeItem)) : null);
}

function eventRow(event) {
  return el("tr", { "data-seq": event.seq, "data-type": event.type },
    el("td", {}, String(event.seq)),
    el("td", { class: "mono" }, event.type),
    el("td", {}, formatTime(toDate(event.recorded_at))),
    el("td", {}, collapsible("data", jsonBlock(event.data))));
}
