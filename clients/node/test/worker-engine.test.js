'use strict';
// The Node worker (worker.js) against a real engine (and store) whose address is in KEEL_ENGINE, as
// test/keel.test.js does: tests/client/test_node_client.py starts both and runs `node --test` here.
// Every test uses a queue of its own. Handlers wait for the test through latches, never for a time.

const test = require('node:test');
const assert = require('node:assert/strict');
const { randomUUID } = require('node:crypto');
const grpc = require('@grpc/grpc-js');
const { KeelClient, keelError } = require('../keel');
const { Worker, OpFailure, loadWorkerService } = require('../worker');

const ENGINE = process.env.KEEL_ENGINE;
const skip = ENGINE ? false : 'KEEL_ENGINE is not set: start `keel up` and export KEEL_ENGINE=HOST:PORT';
const quiet = { info() {}, warn() {}, error: (message) => console.error(message) };

function queueName() {
  return `node-${randomUUID().slice(0, 8)}`;
}

/** A promise with its resolve function, for handlers that wait for the test (no sleeps). */
function latch() {
  let open;
  const opened = new Promise((resolve) => {
    open = resolve;
  });
  return { open, opened };
}

/** Starts `worker` and returns a function that shuts it down and waits for run() to end. */
function serve(worker) {
  const running = worker.run({ handleSignals: false });
  return async () => {
    await worker.shutdown();
    await running;
  };
}

test('a pipeline mixing in-process steps and Node worker steps completes, facts recorded once', { skip }, async () => {
  const taskQueue = queueName();
  const ledger = [];
  const worker = new Worker({
    address: ENGINE,
    taskQueue,
    concurrency: 4,
    logger: quiet,
    ops: [
      {
        id: 'double',
        handler: async (input, ctx) => ({ n: input.n * 2, saw: Object.keys(ctx.context).sort(), factor: ctx.opConfig.factor }),
      },
      {
        id: 'charge',
        version: '2',
        handler: async (input, ctx) => {
          const receipt = await ctx.io.call('payments', { amount: input.n }, `charge:${ctx.runId}`);
          // The same key again in the same attempt: served from what was just recorded.
          const again = await ctx.io.call('payments', { amount: input.n }, `charge:${ctx.runId}`);
          assert.deepEqual(again, receipt);
          return { receipt, attempt: ctx.attempt, queue: ctx.taskQueue };
        },
      },
      {
        id: 'audit',
        handler: async (input, ctx) => ({
          // Recorded by the `charge` step: facts are keyed per run, so it is served, not called.
          receipt: await ctx.io.call('payments', { amount: -1 }, `charge:${ctx.runId}`),
        }),
      },
    ],
    transports: {
      payments: async (request, call) => {
        ledger.push([call.factKey, call.stepId, call.attempt]);
        return { paid: request.amount, fencing: call.fencing };
      },
    },
  });
  const stop = serve(worker);
  const keel = new KeelClient(ENGINE);
  try {
    const started = await keel.startRun({
      input: { n: 21 },
      context: { region: 'eu' },
      pipeline: {
        pipeline_id: 'node-worker-mixed',
        steps: [
          { step_id: 'a', op_id: 'keel.echo', op_config: { x: 1 } },
          { step_id: 'b', op_id: 'double', task_queue: taskQueue, op_config: { factor: 2 }, depends_on: ['a'], heartbeat_timeout: '30s' },
          { step_id: 'c', op_id: 'charge', op_version: '2', taskQueue, depends_on: ['b'], startToCloseTimeout: 60000 },
          { step_id: 'd', op_id: 'audit', taskQueue, depends_on: ['c'] },
          { step_id: 'e', op_id: 'keel.transform', depends_on: ['d'], op_config: { fields: { n: '$context.b.n', paid: '$context.c.receipt.paid' } } },
        ],
      },
    });
    const { run } = await keel.awaitRun(started.runId, { maxWaitMs: 60000 });
    assert.equal(run.status, 'completed', JSON.stringify(run.error));
    assert.deepEqual(run.finalSnapshot.b, { n: 42, saw: ['a', 'region'], factor: 2 });
    assert.equal(run.finalSnapshot.c.receipt.paid, 21);
    assert.deepEqual(run.finalSnapshot.d, { receipt: run.finalSnapshot.c.receipt });
    assert.deepEqual(run.finalSnapshot.e, { n: 42, paid: 21 });
    assert.deepEqual(run.finalSnapshot.c.queue, taskQueue);
    assert.deepEqual(ledger, [[`charge:${started.runId}`, 'c', 0]]);
    const remote = run.steps.filter((step) => ['b', 'c', 'd'].includes(step.stepId));
    assert.deepEqual(remote.map((step) => step.attempts.map((attempt) => [attempt.taskQueue, attempt.workerId])), [
      [[taskQueue, worker.workerId]],
      [[taskQueue, worker.workerId]],
      [[taskQueue, worker.workerId]],
    ]);
    assert.equal(run.steps.find((step) => step.stepId === 'a').attempts[0].workerId, '');
    const ops = await keel.listOps();
    const declared = ops.filter((op) => op.taskQueue === taskQueue).map((op) => `${op.opId}@${op.opVersion}`).sort();
    assert.deepEqual(declared, ['audit@1', 'charge@2', 'double@1']);
    assert.equal(worker.completed, 3);
    const queue = (await keel.listQueues()).find((item) => item.taskQueue === taskQueue);
    assert.deepEqual(queue.workers.map((seen) => seen.workerId), [worker.workerId]);
    assert.deepEqual(queue.workers[0].ops.map((op) => `${op.opId}@${op.opVersion}`).sort(), ['audit@1', 'charge@2', 'double@1']);
    assert.ok(queue.workers[0].lastSeen instanceof Date);
    assert.equal(queue.backlog, 0);
  } finally {
    keel.close();
    await stop();
  }
});

test('a thrown error fails the attempt: retried when retryable, the run failed with its code when not', { skip }, async () => {
  const taskQueue = queueName();
  const attempts = [];
  const worker = new Worker({
    address: ENGINE,
    taskQueue,
    logger: quiet,
    ops: [
      {
        id: 'flaky',
        handler: async (input, ctx) => {
          attempts.push(ctx.attempt);
          if (ctx.attempt === 0) throw new Error('first attempt always fails');
          return { attempt: ctx.attempt };
        },
      },
      {
        id: 'declines',
        handler: async () => {
          throw new OpFailure('card_declined', 'the card was declined', { retryable: false, details: { last4: '4242' } });
        },
      },
      { id: 'not-json', handler: async () => ({ when: 10n }) },
    ],
  });
  const stop = serve(worker);
  const keel = new KeelClient(ENGINE);
  try {
    const flaky = await keel.startRun({ op: 'flaky', taskQueue });
    const retried = (await keel.awaitRun(flaky.runId, { maxWaitMs: 60000 })).run;
    assert.equal(retried.status, 'completed');
    assert.deepEqual(retried.finalSnapshot.main, { attempt: 1 });
    const [first, second] = retried.steps[0].attempts;
    assert.equal(first.error.code, 'op_failed');
    assert.equal(first.error.retryable, true);
    assert.match(first.error.message, /Error: first attempt always fails/);
    assert.equal(second.status, 'completed');
    assert.deepEqual(attempts, [0, 1]);

    const declined = await keel.startRun({ op: 'declines', taskQueue });
    const failed = (await keel.awaitRun(declined.runId, { maxWaitMs: 60000 })).run;
    assert.equal(failed.status, 'failed');
    assert.equal(failed.steps[0].attempts.length, 1, 'a non-retryable failure is not retried');
    assert.deepEqual(failed.steps[0].lastError, {
      code: 'card_declined',
      category: 'op',
      retryable: false,
      message: 'the card was declined',
      details: { last4: '4242' },
    });

    const bad = await keel.startRun({ op: 'not-json', taskQueue });
    const invalid = (await keel.awaitRun(bad.runId, { maxWaitMs: 60000 })).run;
    assert.equal(invalid.status, 'failed');
    assert.equal(invalid.steps[0].lastError.code, 'op_output_invalid');
    assert.equal(invalid.steps[0].attempts.length, 1);
  } finally {
    keel.close();
    await stop();
  }
});

test('a replay serves the replayed run\'s facts to the worker and calls nothing', { skip }, async () => {
  const taskQueue = queueName();
  const ledger = [];
  const replays = [];
  const charge = (keyOf) => async (input, ctx) => {
    replays.push(ctx.replay);
    return { receipt: await ctx.io.call('payments', { amount: input.n }, keyOf(input, ctx)) };
  };
  const worker = new Worker({
    address: ENGINE,
    taskQueue,
    logger: quiet,
    ops: [
      { id: 'charge-order', handler: charge((input) => `charge:${input.order}`) },
      { id: 'charge-run', handler: charge((input, ctx) => `charge:${ctx.runId}`) },
    ],
    transports: {
      payments: async (request, call) => {
        ledger.push(call.factKey);
        return { paid: request.amount };
      },
    },
  });
  const stop = serve(worker);
  const keel = new KeelClient(ENGINE);
  try {
    for (const [opId, code] of [['charge-order', null], ['charge-run', 'replay_fact_missing']]) {
      const order = `A-${randomUUID()}`;
      const original = await keel.startRun({ op: opId, taskQueue, input: { n: 3, order } });
      const first = (await keel.awaitRun(original.runId, { maxWaitMs: 60000 })).run;
      assert.equal(first.status, 'completed');
      const calls = ledger.length;
      const replay = await keel.startRun({
        op: opId,
        taskQueue,
        input: { n: 3, order },
        runConfig: { executionMode: 'replay', replayOfRunId: original.runId },
      });
      const replayed = (await keel.awaitRun(replay.runId, { maxWaitMs: 60000 })).run;
      assert.equal(ledger.length, calls, 'a replay calls nothing');
      if (code === null) {
        assert.equal(replayed.status, 'completed');
        assert.deepEqual(replayed.finalSnapshot, first.finalSnapshot);
      } else {
        // The fact is keyed by the run id: the replayed run recorded no such fact.
        assert.equal(replayed.status, 'failed');
        assert.equal(replayed.steps[0].lastError.code, code);
        assert.equal(replayed.steps[0].attempts.length, 1);
      }
    }
    assert.deepEqual(replays, [false, true, false, true]);
  } finally {
    keel.close();
    await stop();
  }
});

test('a cancel of the run reaches the handler through its heartbeat as ctx.signal and ctx.cancelRequested', { skip }, async () => {
  const taskQueue = queueName();
  const started = latch();
  const stopped = latch();
  const worker = new Worker({
    address: ENGINE,
    taskQueue,
    logger: quiet,
    heartbeatEveryMs: 200,
    ops: [
      {
        id: 'forever',
        handler: (input, ctx) =>
          new Promise((resolve, reject) => {
            ctx.signal.addEventListener('abort', () => {
              stopped.open({ cancelRequested: ctx.cancelRequested, reason: ctx.signal.reason.message });
              reject(ctx.signal.reason);
            });
            started.open(ctx.runId);
          }),
      },
    ],
  });
  const stop = serve(worker);
  const keel = new KeelClient(ENGINE);
  try {
    const { runId } = await keel.startRun({ op: 'forever', taskQueue });
    assert.equal(await started.opened, runId);
    assert.deepEqual(await keel.terminalize(runId, 'canceled', 'test cancels'), { outcome: 'transitioned', status: 'canceled' });
    assert.deepEqual(await stopped.opened, { cancelRequested: true, reason: 'the run asked the task to stop' });
    assert.equal((await keel.getRun(runId)).status, 'canceled');
    assert.equal(worker.completed, 0);
  } finally {
    keel.close();
    await stop();
  }
});

test('a context too large to travel in the task is read through GetArtifact', { skip }, async () => {
  const taskQueue = queueName();
  // Two outputs of 600 KiB each (an output must fit in one event): together past the 1 MiB inline limit.
  const half = (letter) => letter.repeat(600 * 1024);
  const worker = new Worker({
    address: ENGINE,
    taskQueue,
    logger: quiet,
    ops: [
      { id: 'make-half', handler: async (input, ctx) => ({ blob: half(ctx.opConfig.letter) }) },
      {
        id: 'measure',
        handler: async (input, ctx) => ({
          same: ctx.context.left.blob === half('l') && ctx.context.right.blob === half('r'),
          steps: Object.keys(ctx.context).sort(),
        }),
      },
    ],
  });
  const artifactsRead = [];
  const readArtifact = worker._readArtifact.bind(worker);
  worker._readArtifact = async (method, request) => {
    artifactsRead.push(request.artifact_id);
    return readArtifact(method, request);
  };
  const stop = serve(worker);
  const keel = new KeelClient(ENGINE);
  try {
    const { runId } = await keel.startRun({
      pipeline: {
        pipeline_id: 'node-worker-big-context',
        steps: [
          { step_id: 'left', op_id: 'make-half', op_config: { letter: 'l' }, task_queue: taskQueue },
          { step_id: 'right', op_id: 'make-half', op_config: { letter: 'r' }, task_queue: taskQueue },
          { step_id: 'measure', op_id: 'measure', task_queue: taskQueue, depends_on: ['left', 'right'] },
        ],
      },
    });
    const { run } = await keel.awaitRun(runId, { maxWaitMs: 60000 });
    assert.equal(run.status, 'completed', JSON.stringify(run.error));
    assert.deepEqual(run.finalSnapshot.measure, { same: true, steps: ['left', 'right'] });
    assert.equal(artifactsRead.length, 1, 'only the second step starts from a context past the inline limit');
  } finally {
    keel.close();
    await stop();
  }
});

test('shutdown waits for a running task that finishes within its grace', { skip }, async () => {
  const taskQueue = queueName();
  const started = latch();
  const release = latch();
  const handler = async (input, ctx) => {
    started.open(ctx.attempt);
    await release.opened;
    return { finishedBy: ctx.workerId, attempt: ctx.attempt, aborted: ctx.signal.aborted };
  };
  const keel = new KeelClient(ENGINE);
  try {
    // Finishing within the grace: shutdown waits for the task.
    const patient = new Worker({ address: ENGINE, taskQueue, logger: quiet, ops: [{ id: 'slow', handler }] });
    const patientRun = patient.run({ handleSignals: false });
    const first = await keel.startRun({ op: 'slow', taskQueue });
    await started.opened;
    const stopping = patient.shutdown({ graceMs: 600000 });
    release.open();
    await stopping;
    await patientRun;
    const finished = (await keel.awaitRun(first.runId, { maxWaitMs: 60000 })).run;
    assert.deepEqual(finished.finalSnapshot.main, { finishedBy: patient.workerId, attempt: 0, aborted: false });
    assert.equal(patient.completed, 1);
  } finally {
    keel.close();
  }
});

test('a task handed back at shutdown is retried by another worker as the next attempt', { skip }, async () => {
  const taskQueue = queueName();
  const started = latch();
  const abortedWith = latch();
  const keel = new KeelClient(ENGINE);
  try {
    const leaving = new Worker({
      address: ENGINE,
      taskQueue,
      logger: quiet,
      ops: [
        {
          id: 'slow',
          handler: (input, ctx) =>
            new Promise((resolve, reject) => {
              ctx.signal.addEventListener('abort', () => {
                abortedWith.open(ctx.signal.reason.code);
                reject(ctx.signal.reason);
              });
              started.open(ctx.attempt);
            }),
        },
      ],
    });
    const leavingRun = leaving.run({ handleSignals: false });
    const { runId } = await keel.startRun({ op: 'slow', taskQueue });
    assert.equal(await started.opened, 0);
    await leaving.shutdown({ graceMs: 0 });
    await leavingRun;
    assert.equal(await abortedWith.opened, 'worker_shutdown');

    const staying = new Worker({
      address: ENGINE,
      taskQueue,
      logger: quiet,
      ops: [{ id: 'slow', handler: async (input, ctx) => ({ attempt: ctx.attempt, by: ctx.workerId }) }],
    });
    const stop = serve(staying);
    try {
      const { run } = await keel.awaitRun(runId, { maxWaitMs: 60000 });
      assert.equal(run.status, 'completed');
      assert.deepEqual(run.finalSnapshot.main, { attempt: 1, by: staying.workerId });
      const [handedBack, retried] = run.steps[0].attempts;
      assert.equal(handedBack.error.code, 'worker_shutdown');
      assert.equal(handedBack.workerId, leaving.workerId);
      assert.equal(retried.workerId, staying.workerId);
    } finally {
      await stop();
    }
  } finally {
    keel.close();
  }
});

test('no more than `concurrency` tasks run at once on one worker', { skip }, async () => {
  const taskQueue = queueName();
  let active = 0;
  let most = 0;
  const twoRunning = latch();
  const release = latch();
  const worker = new Worker({
    address: ENGINE,
    taskQueue,
    concurrency: 2,
    logger: quiet,
    ops: [
      {
        id: 'hold',
        handler: async (input) => {
          active += 1;
          most = Math.max(most, active);
          if (active === 2) twoRunning.open();
          await release.opened;
          active -= 1;
          return { i: input.i };
        },
      },
    ],
  });
  const stop = serve(worker);
  const keel = new KeelClient(ENGINE);
  try {
    const runs = await Promise.all([0, 1, 2, 3].map((i) => keel.startRun({ op: 'hold', taskQueue, input: { i } })));
    await twoRunning.opened;
    release.open();
    for (const [i, { runId }] of runs.entries()) {
      const { run } = await keel.awaitRun(runId, { maxWaitMs: 60000 });
      assert.deepEqual(run.finalSnapshot.main, { i });
    }
    assert.equal(most, 2);
    assert.equal(worker.completed, 4);
  } finally {
    keel.close();
    await stop();
  }
});

test('PollTask with a bad queue name is refused with invalid_task_queue', { skip }, async () => {
  const WorkerService = loadWorkerService();
  const stub = new WorkerService(ENGINE, grpc.credentials.createInsecure());
  try {
    const error = await new Promise((resolve) => {
      stub.PollTask({ task_queue: 'no spaces', worker_id: 'w', wait: { seconds: '1' } }, (failure) => resolve(keelError(failure)));
    });
    assert.equal(error.code, 'invalid_task_queue');
    assert.equal(error.grpcCode, grpc.status.INVALID_ARGUMENT);
  } finally {
    stub.close();
  }
});
