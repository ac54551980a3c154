'use strict';
// A Node worker process for tests/client/test_node_worker.py:
//   node node_worker_process.js ENGINE TASK_QUEUE WORKER_ID LEDGER_FILE [--hang-after-first | --pause-after-first]
//       [--concurrency N] [--ca FILE] [--token T]
// Its transport `ledger` appends one line per real execution to LEDGER_FILE (the test's own count).
// With --hang-after-first, `node.ledgered` prints `HUNG <run> <attempt>` once its first call is
// recorded and then never finishes (heartbeating on), for the test to SIGKILL it there; with
// --pause-after-first it prints `PAUSING <run> <attempt>` there and goes on after a SIGCONT.
// --concurrency N: tasks at once (default 4); --ca FILE: TLS to the engine; --token T: its bearer token.

const fs = require('node:fs');
const path = require('node:path');
const { Worker } = require(path.resolve(__dirname, '..', '..', 'clients', 'node', 'worker'));

const [engine, taskQueue, workerId, ledgerFile, ...flags] = process.argv.slice(2);
const hangAfterFirst = flags.includes('--hang-after-first');
const pauseAfterFirst = flags.includes('--pause-after-first');
const flag = (name) => (flags.includes(name) ? flags[flags.indexOf(name) + 1] : undefined);
const toStderr = { info: (m) => console.error(m), warn: (m) => console.error(m), error: (m) => console.error(m) };

const ops = [
  {
    id: 'node.enrich',
    description: 'Doubles n',
    handler: async (input, ctx) => ({ n: input.n * 2, saw: Object.keys(ctx.context).sort(), by: ctx.workerId }),
  },
  {
    // The length of each context entry's echoed input blob (a context too large to travel inline
    // reaches the worker as an artifact, read through WorkerService.GetArtifact).
    id: 'node.measure',
    handler: async (input, ctx) => ({
      sizes: Object.keys(ctx.context).sort().map((key) => ctx.context[key].input.blob.length),
    }),
  },
  {
    // Prints `WAITING <run>`, then waits until its task is aborted (a cancel of the run reaches it on
    // its next heartbeat) and writes `aborted <run> cancelRequested=<bool>` to the ledger.
    id: 'node.until_aborted',
    handler: async (input, ctx) => {
      const aborted = new Promise((resolve) => ctx.signal.addEventListener('abort', resolve, { once: true }));
      console.log(`WAITING ${ctx.runId}`);
      await aborted;
      fs.appendFileSync(ledgerFile, `aborted ${ctx.runId} cancelRequested=${ctx.cancelRequested}\n`);
      return null;
    },
  },
  {
    id: 'node.ledgered',
    handler: async (input, ctx) => {
      const first = await ctx.io.call('ledger', { what: 'first' }, `first:${ctx.runId}`);
      if (hangAfterFirst) {
        console.log(`HUNG ${ctx.runId} ${ctx.attempt}`);
        await new Promise(() => {});
      }
      if (pauseAfterFirst) {
        // The test stops this process here (SIGSTOP) and lets it go on (SIGCONT) once another
        // worker has finished the step: then it tries to go on as if nothing had happened.
        const resumed = new Promise((resolve) => process.once('SIGCONT', resolve));
        console.log(`PAUSING ${ctx.runId} ${ctx.attempt}`);
        await resumed;
      }
      const second = await ctx.io.call('ledger', { what: 'second' }, `second:${ctx.runId}`);
      return { first, second, attempt: ctx.attempt, by: ctx.workerId };
    },
  },
];

const worker = new Worker({
  address: engine,
  taskQueue,
  workerId,
  ops,
  concurrency: Number(flag('--concurrency') ?? 4),
  tls: flag('--ca') ? { ca: flag('--ca') } : undefined,
  token: flag('--token'),
  shutdownGraceMs: 2000,
  logger: toStderr,
  transports: {
    ledger: async (request, call) => {
      fs.appendFileSync(ledgerFile, `${call.factKey} ${workerId} ${call.attempt}\n`);
      return { what: request.what, by: workerId, attempt: call.attempt };
    },
  },
});
console.log(`WORKER ${worker.workerId} polling ${taskQueue}`);
worker.run().then(() => console.log('STOPPED'));
