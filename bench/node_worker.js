'use strict';
// The Node worker of bench/node_worker_steps.py: the 3-step pipeline's ops (what keel.echo and
// keel.transform do in the engine) on one worker process.
//   node bench/node_worker.js ENGINE TASK_QUEUE CONCURRENCY STATS_FILE
// On SIGTERM it writes each task's schedule-to-start latency (ms, from the task's scheduled_at to
// the handler's start) to STATS_FILE as JSON, then exits.

const fs = require('node:fs');
const path = require('node:path');
const { Worker } = require(path.resolve(__dirname, '..', 'clients', 'node', 'worker'));

const [engine, taskQueue, concurrency, statsFile] = process.argv.slice(2);
const scheduleToStartMs = [];

function started(ctx) {
  if (ctx.scheduledAt) scheduleToStartMs.push(Date.now() - ctx.scheduledAt.getTime());
}

const worker = new Worker({
  address: engine,
  taskQueue,
  concurrency: Number(concurrency),
  logger: { info() {}, warn: (m) => console.error(m), error: (m) => console.error(m) },
  ops: [
    { id: 'bench.echo', handler: async (input, ctx) => (started(ctx), { input, config: ctx.opConfig }) },
    { id: 'bench.x', handler: async (input, ctx) => (started(ctx), { x: input.n }) },
    { id: 'bench.y', handler: async (input, ctx) => (started(ctx), { y: ctx.context.b.x, ok: true }) },
  ],
});
console.log(`node worker ${worker.workerId} polling ${taskQueue}`);
worker.run().then(() => fs.writeFileSync(statsFile, JSON.stringify(scheduleToStartMs)));
