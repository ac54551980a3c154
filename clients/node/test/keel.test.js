'use strict';
// Runs against a real engine (and store) whose address is in KEEL_ENGINE; tests/client/test_node_client.py
// starts both and runs `node --test` here. Without KEEL_ENGINE the tests are skipped, saying why.

const test = require('node:test');
const assert = require('node:assert/strict');
const { randomUUID } = require('node:crypto');
const { KeelClient, KeelError, fromValue, newRunId, toValue } = require('../keel');

const ENGINE = process.env.KEEL_ENGINE;
const skip = ENGINE ? false : 'KEEL_ENGINE is not set: start `keel up` and export KEEL_ENGINE=HOST:PORT';

const PIPELINE = {
  pipeline_id: 'node-client-test',
  steps: [
    { step_id: 'first', op_id: 'keel.echo', op_config: { n: 1, nested: { list: [1, 'two', null, true] } } },
    { step_id: 'second', op_id: 'keel.transform', op_config: { fields: { from_first: '$context.first.config.n' } }, depends_on: ['first'] },
  ],
};

const UUID_V7 = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

test('run ids picked here are UUIDv7s: the time they were made, then random bits', () => {
  const before = Date.now();
  const ids = Array.from({ length: 1000 }, () => newRunId());
  const after = Date.now();
  for (const id of ids) {
    assert.match(id, UUID_V7);
    const madeAt = parseInt(id.slice(0, 8) + id.slice(9, 13), 16);
    assert.ok(before <= madeAt && madeAt <= after, `${id} was made at ${madeAt}, not in [${before}, ${after}]`);
  }
  assert.equal(new Set(ids).size, ids.length);
  // The 74 bits after the time and version are random: each takes both values across the ids.
  const randomBits = (id) => BigInt(`0x${id.slice(15, 18)}`) << 62n | (BigInt(`0x${id.slice(19, 23)}${id.slice(24)}`) & ((1n << 62n) - 1n));
  const varied = ids.reduce((all, id) => all | (randomBits(id) ^ randomBits(ids[0])), 0n);
  assert.equal(varied, (1n << 74n) - 1n);
  // An id made in a later millisecond sorts after, as text.
  const first = newRunId();
  const firstMs = parseInt(first.slice(0, 8) + first.slice(9, 13), 16);
  while (Date.now() <= firstMs) { /* the next millisecond */ }
  assert.ok(newRunId() > first);
});

test('JSON values survive the round trip through google.protobuf.Value', () => {
  const value = { a: 1, b: [true, null, 'x', 2.5], c: { d: {} } };
  assert.deepEqual(fromValue(toValue(value)), value);
});

test('the engine lists its built-in ops with versions', { skip }, async () => {
  const keel = new KeelClient(ENGINE);
  try {
    const ops = await keel.listOps();
    const echo = ops.find((op) => op.opId === 'keel.echo');
    assert.ok(echo, `keel.echo missing from ${JSON.stringify(ops)}`);
    assert.equal(echo.opVersion, '1');
  } finally {
    keel.close();
  }
});

test('starts a run, watches its events to the end, and awaits its result', { skip }, async () => {
  const keel = new KeelClient(ENGINE);
  try {
    const runId = randomUUID();
    const started = await keel.startRun({ pipeline: PIPELINE, input: { who: 'node' }, context: { lang: 'js' }, runId });
    assert.equal(started.runId, runId);
    assert.equal(started.created, true);

    const events = [];
    for await (const event of keel.watchRun(runId)) events.push(event);
    assert.equal(events[0].type, 'RunStarted');
    assert.equal(events[0].seq, 1);
    assert.equal(events.at(-1).type, 'RunCompleted');
    assert.deepEqual(events.map((event) => event.seq), events.map((_, index) => index + 1));
    const completedSteps = events.filter((event) => event.type === 'StepCompleted').map((event) => event.data.step_id);
    assert.deepEqual(completedSteps, ['first', 'second']);

    const { run, done } = await keel.awaitRun(runId);
    assert.equal(done, true);
    assert.equal(run.status, 'completed');
    assert.deepEqual(run.finalSnapshot.first, { input: { who: 'node' }, config: PIPELINE.steps[0].op_config });
    assert.deepEqual(run.finalSnapshot.second, { from_first: 1 });
    assert.equal(run.finalSnapshot.lang, 'js');
    assert.deepEqual(run.steps.map((step) => [step.stepId, step.status]), [['first', 'completed'], ['second', 'completed']]);

    const again = await keel.startRun({ pipeline: PIPELINE, input: { who: 'node' }, context: { lang: 'js' }, runId });
    assert.equal(again.created, false, 'the same run id and manifest must return the existing run');

    const page = await keel.listRuns({ statuses: ['completed'] });
    assert.ok(page.runs.some((summary) => summary.runId === runId));
    assert.deepEqual(run.input, { who: 'node' });
    // Enum values by their proto names too, in any case.
    const byProtoName = await keel.listRuns({ statuses: ['RUN_STATUS_COMPLETED'], pageSize: 1000 });
    assert.ok(byProtoName.runs.some((summary) => summary.runId === runId));
    // Labels on start, shown by getRun and matched by listRuns (with the other filters).
    const team = `node-${randomUUID()}`;
    const labelled = await keel.startRun({ op: 'keel.echo', labels: { team }, wait: true });
    assert.match(labelled.runId, UUID_V7); // picked by the client
    assert.deepEqual((await keel.getRun(labelled.runId)).labels, { team });
    const found = await keel.listRuns({ labels: { team }, pipelineId: 'keel.echo', topLevel: true, startedAfter: new Date(0) });
    assert.deepEqual(found.runs.map((summary) => [summary.runId, summary.pipelineId, summary.labels]), [[labelled.runId, 'keel.echo', { team }]]);
    assert.deepEqual((await keel.listRuns({ labels: { team }, topLevel: false })).runs, []);
    assert.deepEqual((await keel.listRuns({ labels: { team }, startedBefore: new Date(0) })).runs, []);
    // Durations: the echo run ended long before a day had passed, and its duration stopped there.
    const day = 24 * 3600 * 1000;
    const lasted = await keel.listRuns({ labels: { team }, minDuration: 0, maxDuration: `${day / 1000}s` });
    assert.deepEqual(lasted.runs.map((summary) => summary.runId), [labelled.runId]);
    assert.deepEqual((await keel.listRuns({ labels: { team }, minDuration: day })).runs, []);
    await assert.rejects(keel.listRuns({ minDuration: day, maxDuration: 0 }), (error) => error.code === 'invalid_duration');
    await assert.rejects(keel.listRuns({ minDuration: -1 }), TypeError);
    const noop = await keel.terminalize(runId, 'terminal_target_canceled');
    assert.deepEqual(noop, { outcome: 'noop', status: 'completed' });
  } finally {
    keel.close();
  }
});

test('errors carry the ErrorInfo reason', { skip }, async () => {
  const keel = new KeelClient(ENGINE);
  try {
    await assert.rejects(keel.getRun(randomUUID()), (error) => {
      assert.ok(error instanceof KeelError);
      assert.equal(error.code, 'run_not_found');
      return true;
    });
    const cyclic = {
      pipeline_id: 'cyclic',
      steps: [
        { step_id: 'a', op_id: 'keel.echo', depends_on: ['b'] },
        { step_id: 'b', op_id: 'keel.echo', depends_on: ['a'] },
      ],
    };
    await assert.rejects(keel.startRun({ pipeline: cyclic }), (error) => {
      assert.equal(error.code, 'invalid_plan');
      assert.equal(error.category, 'invalid_argument');
      return true;
    });
  } finally {
    keel.close();
  }
});

test('children spawned by a client are listed on their parent and closed with it by policy', { skip }, async () => {
  const keel = new KeelClient(ENGINE);
  try {
    const { runId: parent } = await keel.startRun({ op: 'keel.sleep', opConfig: { seconds: 600 } });
    const sleepy = { op: 'keel.sleep', opConfig: { seconds: 600 } };
    const doomed = await keel.spawnChild({ parentRunId: parent, factKey: 'doomed', ...sleepy });
    const kept = await keel.spawnChild({ parentRunId: parent, factKey: 'kept', parentClosePolicy: 'abandon', ...sleepy });
    const listed = (await keel.getRun(parent)).children;
    assert.deepEqual(
      listed.map((child) => [child.factKey, child.childRunId, child.parentClosePolicy]),
      [['doomed', doomed.childRunId, 'cancel'], ['kept', kept.childRunId, 'abandon']],
    );
    await keel.terminalize(parent, 'canceled');
    assert.equal((await keel.getRun(doomed.childRunId)).status, 'canceled');
    assert.equal((await keel.getRun(kept.childRunId)).status, 'running');
    await keel.terminalize(kept.childRunId, 'canceled');
    const awaited = await keel.awaitChild(kept.childRunId, kept.childManifestId, { parentRunId: parent });
    assert.equal(awaited.status, 'canceled');
  } finally {
    keel.close();
  }
});

test('reruns a run from a step: the steps before it are reused, the run names its rerun', { skip }, async () => {
  const keel = new KeelClient(ENGINE);
  try {
    const old = await keel.startRun({ pipeline: PIPELINE, input: { who: 'node' }, wait: true });
    assert.equal(old.run.status, 'completed');
    const runIdNew = randomUUID();
    const rerun = await keel.rerunRun(old.runId, 'second', { runIdNew });
    assert.deepEqual([rerun.runId, rerun.created], [runIdNew, true]);
    const { run } = await keel.awaitRun(runIdNew);
    assert.equal(run.status, 'completed');
    assert.deepEqual([run.rerunOfRunId, run.rerunFromStepId], [old.runId, 'second']);
    assert.deepEqual(run.steps.map((step) => [step.stepId, step.reusedFromRunId]), [['first', old.runId], ['second', null]]);
    assert.deepEqual(run.finalSnapshot, old.run.finalSnapshot);
    // Each step's dependencies, and its output (also a reused step's).
    assert.deepEqual(run.steps.map((step) => step.dependsOn), [[], ['first']]);
    assert.deepEqual(run.steps.map((step) => [step.hasOutput, step.output]),
      run.steps.map((step) => [true, run.finalSnapshot[step.stepId]]));
    assert.deepEqual((await keel.getRun(old.runId)).reruns, [runIdNew]);
    const again = await keel.rerunRun(old.runId, 'second', { runIdNew });
    assert.equal(again.created, false);
    const deleted = await keel.deleteRun(runIdNew);
    assert.deepEqual(deleted.runIds, [runIdNew]);
    assert.ok(deleted.streams >= 1);
    await assert.rejects(keel.getRun(runIdNew), (error) => error.code === 'run_not_found');
    await assert.rejects(keel.rerunRun(old.runId, 'nope'), (error) => {
      assert.equal(error.code, 'step_not_found');
      assert.equal(error.category, 'not_found');
      return true;
    });
    // Without runIdNew the client picks one, as it does a run id.
    const picked = await keel.rerunRun(old.runId, 'second');
    assert.match(picked.runId, UUID_V7);
    assert.equal(picked.created, true);
  } finally {
    keel.close();
  }
});

test('signals: signalRun delivers once per id, start signals arrive with the start, waits show in getRun', { skip }, async () => {
  const keel = new KeelClient(ENGINE);
  try {
    const waits = {
      pipeline_id: 'node-signals',
      steps: [
        { step_id: 'first', op_id: 'keel.wait_signal', op_config: { name: 'go', timeout_seconds: 3600 } },
        { step_id: 'second', op_id: 'keel.wait_signal', op_config: { name: 'go' }, depends_on: ['first'] },
      ],
    };
    const runId = randomUUID();
    await keel.startRun({ pipeline: waits, runId, signals: [{ name: 'go', payload: { n: 1 } }] });
    let run = await keel.getRun(runId);
    while (!run.steps[1].waitingForSignal) {
      await new Promise((resolve) => setTimeout(resolve, 20));
      run = await keel.getRun(runId);
    }
    assert.equal(run.steps[1].waitingForSignal.name, 'go');
    assert.equal(run.steps[1].waitingForSignal.factKey, 'second.signal');
    assert.equal(run.steps[1].waitingForSignal.timeoutAt, null);
    const sent = await keel.signalRun(runId, 'go', { n: 2 }, { signalId: 'node-2' });
    assert.deepEqual(sent, { signalId: 'node-2', created: true, inboxSeq: 2 });
    const repeat = await keel.signalRun(runId, 'go', { n: 2 }, { signalId: 'node-2' });
    assert.equal(repeat.created, false);
    const { run: done } = await keel.awaitRun(runId);
    assert.equal(done.status, 'completed');
    assert.deepEqual([done.finalSnapshot.first, done.finalSnapshot.second], [{ n: 1 }, { n: 2 }]);
    await assert.rejects(keel.signalRun(runId, 'go', 3), (error) => {
      assert.equal(error.code, 'run_terminal');
      assert.equal(error.category, 'failed_precondition');
      return true;
    });
    await assert.rejects(keel.signalRun(runId, 'not a name', 3), (error) => error.code === 'invalid_signal');
    await assert.rejects(keel.signalRun(randomUUID(), 'go', 3), (error) => error.code === 'run_not_found');
  } finally {
    keel.close();
  }
});
