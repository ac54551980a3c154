'use strict';
// The Node worker (worker.js) without an engine: how failures, options and durations are translated.
// test/worker-engine.test.js runs it against a real engine.

const test = require('node:test');
const assert = require('node:assert/strict');
const { KeelError, toDuration } = require('../keel');
const { Worker, OpFailure, failureOf, loadWorkerService } = require('../worker');

test('a thrown value becomes the ErrorDetail FailTask sends', () => {
  assert.deepEqual(failureOf(new OpFailure('card_declined', 'no funds', { retryable: false, details: { card: 'x' } })), {
    code: 'card_declined',
    category: 'op',
    retryable: false,
    message: 'no funds',
    details: { structValue: { fields: { card: { stringValue: 'x' } } } },
  });
  assert.deepEqual(failureOf(new TypeError('boom')), { code: 'op_failed', category: 'op', retryable: true, message: 'TypeError: boom' });
  const permanent = Object.assign(new Error('bad row'), { retryable: false });
  assert.equal(failureOf(permanent).retryable, false);
  assert.deepEqual(failureOf('just a string'), { code: 'op_failed', category: 'op', retryable: true, message: 'thrown: just a string' });
  const refused = new KeelError('secrets_detected', 'that key looks like a secret', { retryable: false });
  assert.deepEqual(failureOf(refused), { code: 'secrets_detected', category: 'op', retryable: false, message: 'that key looks like a secret' });
  // A code the engine would refuse does not lose the failure.
  assert.equal(failureOf(new OpFailure('', 'empty code')).code, 'op_failed');
  assert.equal(failureOf(new OpFailure('x'.repeat(129), 'long code')).code, 'op_failed');
  assert.equal(failureOf(new Error('m'.repeat(20000))).message.length, 8000);
});

test('a worker refuses a bad queue, no ops, a duplicate op and a bad concurrency', () => {
  const handler = async () => null;
  assert.throws(() => new Worker({ taskQueue: 'bad queue', ops: [{ id: 'a', handler }] }), /taskQueue/);
  assert.throws(() => new Worker({ taskQueue: '-x', ops: [{ id: 'a', handler }] }), /taskQueue/);
  assert.throws(() => new Worker({ taskQueue: 'q', ops: [] }), /at least one op/);
  assert.throws(() => new Worker({ taskQueue: 'q', ops: [{ id: 'a' }] }), /handler/);
  assert.throws(() => new Worker({ taskQueue: 'q', ops: [{ id: 'a', handler }, { id: 'a', version: '1', handler }] }), /a@1 is declared twice/);
  assert.throws(() => new Worker({ taskQueue: 'q', ops: [{ id: 'a', handler }], concurrency: 0 }), /concurrency/);
  assert.throws(() => new Worker({ taskQueue: 'q', ops: [{ id: 'a', handler }], tls: { cert: 'c.pem' } }), /both tls.cert and tls.key/);
  const worker = new Worker({ taskQueue: 'q.1_x-y', ops: [{ id: 'a', handler }, { id: 'a', version: '2', handler }] });
  assert.match(worker.workerId, /-\d+-[0-9a-f]{6}$/);
  assert.equal(worker.concurrency, 10);
  assert.equal(typeof loadWorkerService(), 'function');
});

test('step timeouts travel as google.protobuf.Duration from milliseconds or proto-JSON', () => {
  assert.deepEqual(toDuration(1500), { seconds: '1', nanos: 500000000 });
  assert.deepEqual(toDuration('2.25s'), { seconds: '2', nanos: 250000000 });
  assert.deepEqual(toDuration({ seconds: 3 }), { seconds: '3', nanos: 0 });
  assert.equal(toDuration(undefined), undefined);
  assert.throws(() => toDuration('10 minutes'), /duration like/);
  assert.throws(() => toDuration(-1), /non-negative/);
});
