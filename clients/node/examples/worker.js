'use strict';
// A Keel worker in Node.js. It polls the task queue `node-example` of the engine at KEEL_ENGINE
// (default 127.0.0.1:7070) and executes the op `quote`, whose one I/O call (a price lookup) is
// recorded as a fact of the run, so that a retry, here or on another worker, never repeats it.
//
//   KEEL_ENGINE=127.0.0.1:7070 node examples/worker.js          # starts one run, prints it, exits
//   KEEL_ENGINE=127.0.0.1:7070 node examples/worker.js --serve  # serves until SIGTERM / Ctrl-C

const { KeelClient } = require('../keel');
const { Worker, OpFailure } = require('../worker');

const TASK_QUEUE = process.env.KEEL_TASK_QUEUE || 'node-example';
const PRICES = { apple: 0.5, pear: 0.75 };

// The real I/O: in a real worker an HTTP call or a database query. Its answer becomes a fact.
async function lookUpPrice(request, call) {
  console.log(`  looking up ${request.item} (fact ${call.factKey}, attempt ${call.attempt})`);
  return { item: request.item, unitPrice: PRICES[request.item] ?? null };
}

const quote = {
  id: 'quote',
  version: '1',
  description: 'Prices an order',
  async handler(input, ctx) {
    const price = await ctx.io.call('prices', { item: input.item }, `price:${input.item}`);
    if (price.unitPrice === null) throw new OpFailure('unknown_item', `no price for ${input.item}`, { retryable: false });
    return { item: input.item, total: price.unitPrice * input.quantity, currency: ctx.opConfig.currency };
  },
};

function newWorker() {
  return new Worker({
    address: process.env.KEEL_ENGINE,
    taskQueue: TASK_QUEUE,
    ops: [quote],
    transports: { prices: lookUpPrice },
    concurrency: 8,
  });
}

async function demo() {
  const worker = newWorker();
  const serving = worker.run();
  const keel = new KeelClient(process.env.KEEL_ENGINE);
  try {
    const started = await keel.startRun({
      input: { item: 'pear', quantity: 4 },
      pipeline: {
        pipeline_id: 'node-worker-example',
        steps: [
          // Executed by this worker (any worker polling the queue), not by the engine.
          { step_id: 'quote', op_id: 'quote', task_queue: TASK_QUEUE, op_config: { currency: 'EUR' }, heartbeat_timeout: '30s' },
          // Executed in the engine's process, as before.
          { step_id: 'confirm', op_id: 'keel.transform', op_config: { fields: { total: '$context.quote.total' } }, depends_on: ['quote'] },
        ],
      },
    });
    console.log(`started run ${started.runId}`);
    const { run } = await keel.awaitRun(started.runId);
    console.log(`run ${run.runId} ${run.status}; step quote ran on ${run.steps[0].attempts.at(-1).workerId}`);
    console.log(JSON.stringify(run.finalSnapshot, null, 2));
    process.exitCode = run.status === 'completed' ? 0 : 1;
  } finally {
    keel.close();
    await worker.shutdown();
    await serving;
  }
}

if (process.argv.includes('--serve')) {
  const worker = newWorker();
  console.log(`worker ${worker.workerId} polling ${TASK_QUEUE}`);
  worker.run().then(() => console.log('worker stopped'));
} else {
  demo().catch((error) => {
    console.error(`example failed: ${error.code ? `${error.code}: ` : ''}${error.message}`);
    process.exitCode = 1;
  });
}
