'use strict';
// A Keel worker for Node.js: executes the steps of Keel runs whose `task_queue` names your queue,
// through keel.worker.v1.WorkerService on the engine's port (protos/keel/worker/v1/worker.proto,
// loaded as it is, like keel.js loads the engine's proto).
//
//   const { Worker } = require('./worker');
//   const worker = new Worker({
//     address: '127.0.0.1:7070',
//     taskQueue: 'payments',
//     ops: [{ id: 'charge', handler: async (input, ctx) => {
//       const receipt = await ctx.io.call('payments', { amount: input.amount }, `charge:${input.order}`);
//       return { receipt };
//     } }],
//     transports: { payments: async (request, call) => pay(request, call.factKey) },
//   });
//   await worker.run();   // until SIGTERM / SIGINT, then a graceful shutdown
//
// An op is `{id, version = '1', handler: async (input, ctx) => output}`; ctx holds the run, step and
// attempt, `opConfig`, `context` (what the step sees), `signal` (an AbortSignal, aborted when the
// run asks the task to stop, the claim is lost or the worker hands the task back) and `io`. I/O goes
// through `ctx.io.call(namespace, request, factKey)`: an answer already recorded in the run is
// returned without calling; otherwise the worker's transport for `namespace` is called and its answer
// recorded (RecordFact) before the handler sees it, so a retried attempt never repeats it. This is
// the shape of keel_client.worker (Python): same fact rules, heartbeats, hand-back and error codes.

const fs = require('node:fs');
const os = require('node:os');
const { randomBytes } = require('node:crypto');
const grpc = require('@grpc/grpc-js');
const { fromValue, toValue, toDuration, keelError, loadWorkerService } = require('./keel');

const DEFAULT_ENGINE = '127.0.0.1:7070';
const DEFAULT_POLL_WAIT_MS = 20000;
// Unary calls other than PollTask give up after this long (and are retried while UNAVAILABLE).
const CALL_DEADLINE_MS = 30000;
// A poll's deadline is its wait plus this much: the engine answers (with no task) before it.
const POLL_DEADLINE_MARGIN_MS = 10000;
const MAX_MESSAGE_BYTES = 16 * 1024 * 1024;
// What the engine accepts as an error code (1 to 128 characters, no control characters) and message.
const MAX_CODE_CHARS = 128;
const MAX_MESSAGE_CHARS = 8000;

/** Throw from a handler to fail its attempt with a code of your own; `retryable` decides a retry. */
class OpFailure extends Error {
  constructor(code, message, { retryable = true, details } = {}) {
    super(message);
    this.name = 'OpFailure';
    this.code = code;
    this.retryable = retryable;
    this.details = details || {};
  }
}

// The claim is no longer current (another worker or a timeout decided the task): write nothing more.
class StaleClaim extends Error {
  constructor(message) {
    super(message);
    this.name = 'StaleClaim';
  }
}

function durationMs(duration) {
  if (!duration) return null;
  return Number(duration.seconds || 0) * 1000 + Math.floor((duration.nanos || 0) / 1e6);
}

function opKey(id, version) {
  return `${id}@${version || '1'}`;
}

function isPlainObject(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

/** A promise that resolves after `ms`, or at once when `signal` aborts. */
function pause(ms, signal) {
  return new Promise((resolve) => {
    if (signal && signal.aborted) {
      resolve();
      return;
    }
    const done = () => {
      clearTimeout(timer);
      if (signal) signal.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    if (signal) signal.addEventListener('abort', done, { once: true });
  });
}

/** The ErrorDetail a handler's failure becomes (what FailTask sends). */
function failureOf(error) {
  let code = 'op_failed';
  let message;
  let retryable = true;
  let details = {};
  if (error instanceof OpFailure) {
    ({ code, message, retryable } = error);
    details = error.details;
  } else if (error && error.name === 'KeelError') {
    // A refused call the handler made (through this client or keel.js): the engine's own code.
    ({ code, message } = error);
    retryable = Boolean(error.retryable);
  } else if (error instanceof Error) {
    message = `${error.name}: ${error.message}`;
    if (typeof error.retryable === 'boolean') retryable = error.retryable;
  } else {
    message = `thrown: ${String(error)}`;
  }
  const validCode = typeof code === 'string' && code.length > 0 && code.length <= MAX_CODE_CHARS && !/[\x00-\x1f]/.test(code);
  const detail = {
    code: validCode ? code : 'op_failed',
    category: 'op',
    retryable: Boolean(retryable),
    message: String(message ?? '').slice(0, MAX_MESSAGE_CHARS),
  };
  if (isPlainObject(details) && Object.keys(details).length > 0) {
    try {
      detail.details = toValue(details);
    } catch {
      // details that are not JSON are left out rather than losing the failure itself
    }
  }
  return detail;
}

function readPem(item) {
  if (item === undefined || item === null) return null;
  if (Buffer.isBuffer(item)) return item;
  const text = String(item);
  return text.includes('-----BEGIN') ? Buffer.from(text) : fs.readFileSync(text);
}

/** Channel credentials from `credentials` (grpc-js), `tls` (true or {ca, cert, key}: PEM or file path), or none. */
function channelCredentials({ credentials, tls }) {
  if (credentials) return credentials;
  if (!tls) return grpc.credentials.createInsecure();
  if (tls === true) return grpc.credentials.createSsl();
  if ((tls.cert == null) !== (tls.key == null)) throw new TypeError('a client certificate needs both tls.cert and tls.key');
  return grpc.credentials.createSsl(readPem(tls.ca), readPem(tls.key), readPem(tls.cert));
}

function checkOps(ops) {
  if (!Array.isArray(ops) || ops.length === 0) throw new TypeError('a worker needs at least one op: ops: [{id, handler}]');
  const byKey = new Map();
  for (const op of ops) {
    if (!op || typeof op.id !== 'string' || op.id.length === 0) throw new TypeError('every op needs an id (a string)');
    if (typeof op.handler !== 'function') throw new TypeError(`op ${op.id} needs a handler: async (input, ctx) => output`);
    const version = op.version === undefined || op.version === '' ? '1' : String(op.version);
    const key = opKey(op.id, version);
    if (byKey.has(key)) throw new TypeError(`op ${key} is declared twice`);
    byKey.set(key, { id: op.id, version, handler: op.handler, description: op.description || '' });
  }
  return byKey;
}

const QUEUE_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

// ---- one task -------------------------------------------------------------------------------------

const ABANDONED = Symbol('abandoned');

/** One claimed task on this worker: its facts, its abort signal, its heartbeats and its outcome. */
class Execution {
  constructor(worker, task) {
    this.worker = worker;
    this.task = task;
    this.facts = new Map((task.facts || []).map((fact) => [fact.fact_key, fromValue(fact.response)]));
    this.abortController = new AbortController();
    this.cancelRequested = false;
    this.handedBack = false;
    this.finishing = false;
  }

  get label() {
    return `${this.task.run_id}/${this.task.step_id} attempt ${this.task.attempt || 0}`;
  }

  abort(reason) {
    if (!this.abortController.signal.aborted) this.abortController.abort(reason);
  }

  /** Stop the handler and give the task back to the queue (shutdown past its grace). */
  handBack() {
    if (this.finishing || this.handedBack) return;
    this.handedBack = true;
    this.abort(new OpFailure('worker_shutdown', `worker ${this.worker.workerId} shut down`));
  }

  async run() {
    const { worker, task } = this;
    try {
      const op = worker.ops.get(opKey(task.op_id, task.op_version));
      if (!op) throw new OpFailure('unknown_op', `worker ${worker.workerId} has no op ${opKey(task.op_id, task.op_version)}`);
      if (this.handedBack) throw this.abortController.signal.reason;
      const context = await worker._contextOf(task);
      if (this.handedBack) throw this.abortController.signal.reason;
      const ctx = this._context(op, context);
      const handling = Promise.resolve().then(() => op.handler(ctx.input, ctx));
      const outcome = await this._awaitWithHeartbeats(handling);
      if (outcome === ABANDONED) {
        const reason = this.abortController.signal.reason;
        worker.logger.info(
          this.cancelRequested
            ? `keel worker ${worker.workerId}: task ${this.label} dropped: the run asked it to stop`
            : `keel worker ${worker.workerId}: task ${this.label} is stale: ${reason && reason.message}`,
        );
        return;
      }
      this.finishing = true;
      let output;
      try {
        output = toValue(outcome);
      } catch (error) {
        throw new OpFailure('op_output_invalid', `the op's output is not JSON: ${error.message}`, { retryable: false });
      }
      await worker._call('CompleteTask', { task_token: task.task_token, output });
      worker.completed += 1;
    } catch (error) {
      if (error instanceof StaleClaim) {
        worker.logger.info(`keel worker ${worker.workerId}: task ${this.label} is stale: ${error.message}`);
        return;
      }
      this.finishing = true;
      try {
        await worker._call('FailTask', { task_token: task.task_token, error: failureOf(error) });
        worker.failed += 1;
      } catch (failError) {
        if (!(failError instanceof StaleClaim)) {
          worker.logger.error(`keel worker ${worker.workerId}: could not fail task ${this.label}: ${failError.message}`);
        }
      }
    }
  }

  _context(op, context) {
    const { worker, task } = this;
    const execution = this;
    return {
      runId: task.run_id,
      stepId: task.step_id,
      attempt: task.attempt || 0,
      opId: op.id,
      opVersion: op.version,
      opConfig: fromValue(task.op_config) ?? null,
      input: fromValue(task.input) ?? null,
      context,
      taskQueue: task.task_queue,
      workerId: worker.workerId,
      fencing: Number(task.fencing || 0),
      // The run replays another run: io.call serves that run's facts and calls nothing.
      replay: Boolean(task.replay),
      scheduledAt: task.scheduled_at ? new Date(Number(task.scheduled_at.seconds) * 1000 + Math.floor((task.scheduled_at.nanos || 0) / 1e6)) : null,
      signal: this.abortController.signal,
      get cancelRequested() {
        return execution.cancelRequested;
      },
      io: { call: (namespace, request, factKey) => execution._ioCall(namespace, request, factKey) },
      heartbeat: (details) => execution._heartbeat(details),
    };
  }

  async _ioCall(namespace, request, factKey) {
    if (!factKey) throw new OpFailure('missing_fact_key', `io.call(${JSON.stringify(namespace)}) needs a fact key`, { retryable: false });
    if (this.facts.has(factKey)) return structuredClone(this.facts.get(factKey));
    if (this.task.replay) {
      throw new OpFailure('replay_fact_missing', `replay: the replayed run recorded no fact ${JSON.stringify(factKey)} (a replay makes no new calls)`, {
        retryable: false,
      });
    }
    const transport = this.worker.transports[namespace];
    if (typeof transport !== 'function') {
      throw new OpFailure('unknown_namespace', `this worker has no transport for ${JSON.stringify(namespace)}`, { retryable: false });
    }
    const signal = this.abortController.signal;
    if (signal.aborted) throw signal.reason;
    const { task } = this;
    const call = {
      namespace,
      factKey,
      runId: task.run_id,
      stepId: task.step_id,
      attempt: task.attempt || 0,
      fencing: Number(task.fencing || 0),
      signal,
    };
    const answer = await transport(structuredClone(request), call);
    // Recorded even when the task was asked to stop meanwhile: the call happened, and a recorded
    // fact is never executed again. A claim that is no longer current refuses it (task_stale).
    const recorded = await this.worker._call('RecordFact', {
      task_token: task.task_token,
      namespace,
      fact_key: factKey,
      response: toValue(answer),
    });
    const response = fromValue(recorded.response) ?? null;
    this.facts.set(factKey, response);
    return structuredClone(response);
  }

  async _heartbeat(details) {
    const request = { task_token: this.task.task_token };
    if (details !== undefined) request.details = toValue(details);
    let beat;
    try {
      beat = await this.worker._call('HeartbeatTask', request);
    } catch (error) {
      if (error instanceof StaleClaim) this.abort(error);
      throw error;
    }
    if (beat.cancel_requested && !this.cancelRequested) {
      this.cancelRequested = true;
      this.abort(new StaleClaim('the run asked the task to stop'));
    }
    return { cancelRequested: this.cancelRequested };
  }

  /** The handler's output, heartbeating meanwhile; ABANDONED when the task was stopped or handed back. */
  async _awaitWithHeartbeats(handling) {
    const settled = handling.then(
      (value) => ({ value }),
      (error) => ({ error }),
    );
    const every = this._heartbeatEveryMs();
    const stopped = new Promise((resolve) => this.abortController.signal.addEventListener('abort', () => resolve(null), { once: true }));
    for (;;) {
      let timer;
      const tick = new Promise((resolve) => {
        timer = setTimeout(resolve, every);
      });
      let result;
      try {
        // A hand-back or a cancel aborts the task's signal, which ends `stopped` at once.
        result = await Promise.race([settled, stopped, tick]);
      } finally {
        clearTimeout(timer); // no timer outlives the wait
      }
      if (result && 'error' in result) {
        if (this.handedBack) throw this.abortController.signal.reason;
        if (this.abortController.signal.aborted) return ABANDONED;
        throw result.error;
      }
      if (result) {
        if (this.abortController.signal.aborted && !this.handedBack) return ABANDONED;
        if (this.handedBack) throw this.abortController.signal.reason;
        return result.value;
      }
      if (this.handedBack) throw this.abortController.signal.reason;
      if (this.abortController.signal.aborted) return ABANDONED;
      try {
        await this._heartbeat();
      } catch (error) {
        if (error instanceof StaleClaim) return ABANDONED;
        // The engine was unreachable for a while: keep working; the claim's lease decides.
        this.worker.logger.warn(`keel worker ${this.worker.workerId}: heartbeat of ${this.label} failed: ${error.message}`);
      }
      if (this.cancelRequested) return ABANDONED;
    }
  }

  _heartbeatEveryMs() {
    const timeout = durationMs(this.task.heartbeat_timeout);
    const every = this.worker.heartbeatEveryMs;
    return timeout ? Math.min(every, Math.max(50, timeout / 3)) : every;
  }
}

// ---- the worker -----------------------------------------------------------------------------------

/** Polls `taskQueue` of the engine at `address` and executes the tasks of `ops`. */
class Worker {
  constructor({
    address = process.env.KEEL_ENGINE || DEFAULT_ENGINE,
    taskQueue,
    ops,
    transports = {},
    concurrency = 10,
    workerId,
    token,
    tls,
    credentials,
    pollWaitMs = DEFAULT_POLL_WAIT_MS,
    heartbeatEveryMs = 10000,
    shutdownGraceMs = 30000,
    logger = console,
  } = {}) {
    if (typeof taskQueue !== 'string' || !QUEUE_NAME.test(taskQueue)) {
      throw new TypeError(`taskQueue must be 1 to 128 characters of [A-Za-z0-9._-] starting with a letter or digit, got ${JSON.stringify(taskQueue)}`);
    }
    if (!Number.isInteger(concurrency) || concurrency < 1) throw new TypeError('concurrency must be an integer of at least 1');
    this.address = address;
    this.taskQueue = taskQueue;
    this.ops = checkOps(ops);
    this.transports = { ...transports };
    this.concurrency = concurrency;
    this.workerId = workerId || `${os.hostname()}-${process.pid}-${randomBytes(3).toString('hex')}`;
    this.pollWaitMs = pollWaitMs;
    this.heartbeatEveryMs = heartbeatEveryMs;
    this.shutdownGraceMs = shutdownGraceMs;
    this.logger = logger;
    this.metadata = new grpc.Metadata();
    if (token) this.metadata.set('authorization', `Bearer ${token}`);
    this._credentials = channelCredentials({ credentials, tls });
    this._stub = null;
    this._stopping = false;
    this._stopController = null;
    this._polls = new Set();
    this._running = new Map();
    this._done = null;
    this._graceTimer = null;
    this.completed = 0; // tasks this worker completed
    this.failed = 0; // tasks this worker failed (handed back included)
  }

  /** Tasks being executed now. */
  get running() {
    return this._running.size;
  }

  /**
   * Polls and executes until shutdown() (with `handleSignals`, the default: until SIGTERM or SIGINT;
   * a second signal hands running tasks back at once). Resolves once everything has stopped.
   */
  run({ handleSignals = true } = {}) {
    if (this._done !== null) throw new Error('this worker has already been started');
    const WorkerService = loadWorkerService();
    this._stub = new WorkerService(this.address, this._credentials, {
      'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
      'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
    });
    this._stopController = new AbortController();
    const onSignal = (signal) => {
      if (this._stopping) {
        this.logger.info(`keel worker ${this.workerId}: ${signal} again, handing running tasks back`);
        this._handBackAll();
      } else {
        this.logger.info(`keel worker ${this.workerId}: ${signal}, shutting down`);
        this.shutdown();
      }
    };
    if (handleSignals) {
      process.on('SIGTERM', onSignal);
      process.on('SIGINT', onSignal);
    }
    const pollers = Array.from({ length: this.concurrency }, () => this._pollLoop());
    this._done = Promise.all(pollers).finally(() => {
      clearTimeout(this._graceTimer);
      if (handleSignals) {
        process.off('SIGTERM', onSignal);
        process.off('SIGINT', onSignal);
      }
      this._stub.close();
    }).then(() => undefined);
    return this._done;
  }

  /**
   * Stops polling; running tasks get `graceMs` (default shutdownGraceMs) to finish, then are handed
   * back (FailTask, retryable `worker_shutdown`). Resolves when run() has ended.
   */
  shutdown({ graceMs = this.shutdownGraceMs } = {}) {
    if (this._done === null) return Promise.resolve();
    if (!this._stopping) {
      this._stopping = true;
      this._stopController.abort();
      for (const call of this._polls) call.cancel();
      if (this._running.size > 0) {
        this.logger.info(`keel worker ${this.workerId}: waiting up to ${graceMs} ms for ${this._running.size} task(s)`);
      }
      this._graceTimer = setTimeout(() => this._handBackAll(), graceMs);
    }
    return this._done;
  }

  _handBackAll() {
    for (const execution of this._running.values()) execution.handBack();
  }

  async _pollLoop() {
    let backoff = 100;
    while (!this._stopping) {
      let task;
      try {
        task = await this._poll();
        backoff = 100;
      } catch (error) {
        if (this._stopping) break;
        const transient = error.retryable || error.grpcCode === grpc.status.UNAVAILABLE || error.grpcCode === grpc.status.DEADLINE_EXCEEDED;
        if (!transient) this.logger.error(`keel worker ${this.workerId}: PollTask refused: ${error.code}: ${error.message}`);
        await pause(backoff, this._stopController.signal);
        backoff = Math.min(backoff * 2, 5000);
        continue;
      }
      if (!task) continue;
      const execution = new Execution(this, task);
      this._running.set(task.task_token, execution);
      try {
        if (this._stopping) execution.handBack(); // claimed just as the worker stopped: give it back
        await execution.run();
      } catch (error) {
        // A bug here must not stop the other pollers: the task's timeouts decide it.
        this.logger.error(`keel worker ${this.workerId}: task ${execution.label} broke the worker: ${error.stack || error}`);
      } finally {
        this._running.delete(task.task_token);
      }
    }
  }

  _poll() {
    const request = {
      task_queue: this.taskQueue,
      worker_id: this.workerId,
      ops: [...this.ops.values()].map((op) => ({ op_id: op.id, op_version: op.version, description: op.description })),
      wait: toDuration(this.pollWaitMs),
    };
    const deadline = new Date(Date.now() + this.pollWaitMs + POLL_DEADLINE_MARGIN_MS);
    return new Promise((resolve, reject) => {
      const call = this._stub.PollTask(request, this.metadata, { deadline }, (error, response) => {
        this._polls.delete(call);
        if (!error) resolve(response.task || null);
        else if (error.code === grpc.status.CANCELLED && this._stopping) resolve(null);
        else reject(keelError(error));
      });
      this._polls.add(call);
    });
  }

  _unary(method, request) {
    const deadline = new Date(Date.now() + CALL_DEADLINE_MS);
    return new Promise((resolve, reject) => {
      this._stub[method](request, this.metadata, { deadline }, (error, response) => {
        if (error) reject(keelError(error));
        else resolve(response);
      });
    });
  }

  /** A WorkerService call, retried while UNAVAILABLE (or retryable); `task_stale` rejects with StaleClaim. */
  async _call(method, request, attempt = (m, r) => this._unary(m, r)) {
    let delay = 100;
    const giveUp = Date.now() + CALL_DEADLINE_MS;
    for (;;) {
      try {
        return await attempt(method, request);
      } catch (error) {
        if (error.code === 'task_stale') throw new StaleClaim(error.message);
        const retry = error.retryable || error.grpcCode === grpc.status.UNAVAILABLE;
        if (!retry || Date.now() + delay > giveUp) throw error;
        await pause(delay);
        delay = Math.min(delay * 2, 2000);
      }
    }
  }

  async _readArtifact(method, request) {
    const call = this._stub[method](request, this.metadata, { deadline: new Date(Date.now() + CALL_DEADLINE_MS) });
    const chunks = [];
    try {
      for await (const message of call) chunks.push(Buffer.from(message.data || []));
    } catch (error) {
      throw error.code !== undefined && typeof error.code === 'number' ? keelError(error) : error;
    }
    return Buffer.concat(chunks);
  }

  /** The context the task's step starts from: inline, or read through GetArtifact. */
  async _contextOf(task) {
    if (!task.context_artifact_id) {
      const context = fromValue(task.context);
      return isPlainObject(context) ? context : {};
    }
    const request = { task_token: task.task_token, artifact_id: task.context_artifact_id };
    const data = await this._call('GetArtifact', request, (method, message) => this._readArtifact(method, message));
    const context = JSON.parse(data.toString('utf8'));
    return isPlainObject(context) ? context : {};
  }
}

module.exports = { Worker, OpFailure, failureOf, loadWorkerService };
