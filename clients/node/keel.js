'use strict';
// A small Node.js client of Keel's EngineService. It loads protos/keel/engine/v1/engine.proto as it
// is, with @grpc/proto-loader (the google/protobuf well-known types it imports are built into
// protobufjs, which proto-loader uses, so no extra .proto files are needed), and turns the wire
// shapes into plain JavaScript: JSON values as values, timestamps as Dates, enums as lower-case
// names. Failures are KeelError, whose `code` is the google.rpc.ErrorInfo reason.

const path = require('node:path');
const { randomBytes, randomUUID } = require('node:crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
const ENGINE_PROTO = 'keel/engine/v1/engine.proto';
const WORKER_PROTO = 'keel/worker/v1/worker.proto';
const DEFAULT_ENGINE = '127.0.0.1:7070';
const DEFAULT_DEADLINE_MS = 30000;

/**
 * A new run id: a UUIDv7 (RFC 9562), 48 bits of Unix milliseconds then 74 random bits, as the Python
 * client and the engine pick them (keel_core.ids): runs keyed by ids that follow their creation time
 * land together in the store's indexes, where random ids put each new run on a page of its own.
 */
function newRunId() {
  const bytes = randomBytes(16);
  bytes.writeUIntBE(Date.now(), 0, 6);
  bytes[6] = 0x70 | (bytes[6] & 0x0f); // version 7
  bytes[8] = 0x80 | (bytes[8] & 0x3f); // variant 0b10
  const hex = bytes.toString('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

// gRPC's own retry of UNAVAILABLE; safe for every method because startRun always sends a run id
// (picked here when the caller gives none) and the other RPCs are idempotent.
const SERVICE_CONFIG = {
  methodConfig: [
    {
      name: [{ service: 'keel.engine.v1.EngineService' }],
      retryPolicy: {
        maxAttempts: 5,
        initialBackoff: '0.1s',
        maxBackoff: '2s',
        backoffMultiplier: 2,
        retryableStatusCodes: ['UNAVAILABLE'],
      },
    },
  ],
};

let engineServiceConstructor = null;
let workerServiceConstructor = null;

/** The generated EngineService client constructor, loaded once from the .proto file. */
function loadEngineService() {
  if (engineServiceConstructor === null) {
    const definition = protoLoader.loadSync(ENGINE_PROTO, {
      includeDirs: [PROTO_ROOT],
      keepCase: true,
      longs: String,
      enums: String,
      defaults: false,
      oneofs: true,
    });
    engineServiceConstructor = grpc.loadPackageDefinition(definition).keel.engine.v1.EngineService;
  }
  return engineServiceConstructor;
}

/** The generated WorkerService client constructor (protos/keel/worker/v1/worker.proto), loaded once. */
function loadWorkerService() {
  if (workerServiceConstructor === null) {
    const definition = protoLoader.loadSync(WORKER_PROTO, {
      includeDirs: [PROTO_ROOT],
      keepCase: true,
      longs: String,
      enums: String,
      defaults: false,
      oneofs: true,
    });
    workerServiceConstructor = grpc.loadPackageDefinition(definition).keel.worker.v1.WorkerService;
  }
  return workerServiceConstructor;
}

// ---- JSON values <-> google.protobuf.Value ------------------------------------------------------
// protobufjs defines the well-known types itself, with camelCase field names (`stringValue`, ...),
// whatever `keepCase` says for Keel's own messages.

/** A JSON-ready value as a google.protobuf.Value message object. */
function toValue(value) {
  if (value === null || value === undefined) return { nullValue: 'NULL_VALUE' };
  if (typeof value === 'number') {
    if (!Number.isFinite(value)) throw new TypeError(`${value} is not a JSON number`);
    return { numberValue: value };
  }
  if (typeof value === 'string') return { stringValue: value };
  if (typeof value === 'boolean') return { boolValue: value };
  if (Array.isArray(value)) return { listValue: { values: value.map(toValue) } };
  if (typeof value === 'object') return { structValue: toStruct(value) };
  throw new TypeError(`${typeof value} is not JSON`);
}

/** A JSON object as a google.protobuf.Struct message object. */
function toStruct(object) {
  const fields = {};
  for (const [key, item] of Object.entries(object)) fields[key] = toValue(item);
  return { fields };
}

const VALUE_KINDS = ['nullValue', 'numberValue', 'stringValue', 'boolValue', 'structValue', 'listValue'];

/** A google.protobuf.Value message object as plain JSON (undefined when unset). */
function fromValue(value) {
  if (value === null || value === undefined) return undefined;
  // Decoded messages name their oneof member in `kind`; objects built by toValue() just hold it.
  const kind = value.kind || VALUE_KINDS.find((name) => value[name] !== undefined);
  switch (kind) {
    case 'nullValue':
      return null;
    case 'numberValue':
      return value.numberValue;
    case 'stringValue':
      return value.stringValue;
    case 'boolValue':
      return value.boolValue;
    case 'structValue':
      return fromStruct(value.structValue);
    case 'listValue':
      return ((value.listValue && value.listValue.values) || []).map(fromValue);
    default:
      return undefined;
  }
}

/** A google.protobuf.Struct message object as a plain object. */
function fromStruct(struct) {
  const out = {};
  for (const [key, item] of Object.entries((struct && struct.fields) || {})) out[key] = fromValue(item);
  return out;
}

function fromTimestamp(stamp) {
  if (!stamp) return null;
  return new Date(Number(stamp.seconds) * 1000 + Math.floor((stamp.nanos || 0) / 1e6));
}

function enumName(name, prefix) {
  return name ? String(name).replace(prefix, '').toLowerCase() : 'unspecified';
}

// An enum value for the wire from its short name ('failed') or its proto name
// ('RUN_STATUS_FAILED'), in any case: the one place requests name enum values.
function wireEnum(value, prefix) {
  const name = String(value).trim().toUpperCase();
  return name.startsWith(prefix) ? name : `${prefix}${name}`;
}

// ---- errors ---------------------------------------------------------------------------------------

/** A failed call: `code` is the ErrorInfo reason (e.g. run_not_found), `grpcCode` the status code. */
class KeelError extends Error {
  constructor(code, message, { grpcCode, category, retryable, details } = {}) {
    super(message);
    this.name = 'KeelError';
    this.code = code;
    this.grpcCode = grpcCode;
    this.category = category;
    this.retryable = retryable;
    this.details = details || {};
  }
}

// The ErrorInfo travels in the `grpc-status-details-bin` trailer as a serialized google.rpc.Status.
// Its schema is tiny and stable, so it is read here with a minimal protobuf wire-format reader
// instead of shipping google/rpc/*.proto.
function* protoFields(buffer) {
  let offset = 0;
  const varint = () => {
    let result = 0;
    let shift = 0;
    for (;;) {
      const byte = buffer[offset++];
      result += (byte & 0x7f) * 2 ** shift;
      if (byte < 0x80) return result;
      shift += 7;
    }
  };
  while (offset < buffer.length) {
    const key = varint();
    const field = Math.floor(key / 8);
    const wireType = key & 7;
    if (wireType === 0) {
      yield [field, varint()];
    } else if (wireType === 2) {
      const length = varint();
      yield [field, buffer.subarray(offset, offset + length)];
      offset += length;
    } else if (wireType === 1) {
      offset += 8;
    } else if (wireType === 5) {
      offset += 4;
    } else {
      return;
    }
  }
}

function decodeErrorInfo(statusBytes) {
  for (const [field, any] of protoFields(statusBytes)) {
    if (field !== 3) continue; // google.rpc.Status.details
    let typeUrl = '';
    let value = null;
    for (const [anyField, data] of protoFields(any)) {
      if (anyField === 1) typeUrl = data.toString('utf8');
      if (anyField === 2) value = data;
    }
    if (!typeUrl.endsWith('google.rpc.ErrorInfo') || value === null) continue;
    const info = { reason: '', metadata: {} };
    for (const [infoField, data] of protoFields(value)) {
      if (infoField === 1) info.reason = data.toString('utf8');
      if (infoField === 3) {
        let key = '';
        let item = '';
        for (const [entryField, entryData] of protoFields(data)) {
          if (entryField === 1) key = entryData.toString('utf8');
          if (entryField === 2) item = entryData.toString('utf8');
        }
        info.metadata[key] = item;
      }
    }
    return info;
  }
  return null;
}

/** A KeelError from a gRPC ServiceError, reading the ErrorInfo when the engine sent one. */
function keelError(error) {
  const grpcCode = error.code;
  const codeName = (Object.entries(grpc.status).find(([, number]) => number === grpcCode) || ['UNKNOWN'])[0];
  const message = error.details || error.message;
  const raw = error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  const info = raw && raw.length ? decodeErrorInfo(Buffer.from(raw[0])) : null;
  if (info === null) {
    return new KeelError(codeName.toLowerCase(), message, {
      grpcCode,
      retryable: grpcCode === grpc.status.UNAVAILABLE,
    });
  }
  const { category, retryable, ...details } = info.metadata;
  return new KeelError(info.reason, message, { grpcCode, category, retryable: retryable === 'true', details });
}

// ---- results --------------------------------------------------------------------------------------

function errorDetail(detail) {
  if (!detail) return null;
  return {
    code: detail.code,
    category: detail.category,
    retryable: Boolean(detail.retryable),
    message: detail.message,
    details: fromValue(detail.details),
  };
}

function toRun(run) {
  if (!run) return null;
  return {
    runId: run.run_id,
    opId: run.op_id,
    manifestId: run.manifest_id,
    status: enumName(run.status, 'RUN_STATUS_'),
    parentRunId: run.parent_run_id || null,
    createdAt: fromTimestamp(run.created_at),
    updatedAt: fromTimestamp(run.updated_at),
    completedAt: fromTimestamp(run.completed_at),
    steps: (run.steps || []).map((step) => ({
      stepId: step.step_id,
      opId: step.op_id,
      opVersion: step.op_version,
      status: enumName(step.status, 'STEP_STATUS_'),
      attempts: (step.attempts || []).map((attempt) => ({
        attempt: attempt.attempt || 0,
        status: enumName(attempt.status, 'STEP_STATUS_'),
        startedAt: fromTimestamp(attempt.started_at),
        finishedAt: fromTimestamp(attempt.finished_at),
        error: errorDetail(attempt.error),
        // A remote attempt (its step has a task queue): the queue and the worker that claimed it.
        taskQueue: attempt.task_queue || '',
        workerId: attempt.worker_id || '',
      })),
      lastError: errorDetail(step.last_error),
      // Set when a rerun reused this step: the run whose output it copied.
      reusedFromRunId: step.reused_from_run_id || null,
      dependsOn: [...(step.depends_on || [])],
      // Its output once it completed (hasOutput), from the run's latest checkpoint.
      hasOutput: step.output !== null && step.output !== undefined,
      output: step.output !== null && step.output !== undefined ? fromValue(step.output) : undefined,
      // While its attempt waits for a signal: {name, factKey, since, timeoutAt (null: for ever)}.
      waitingForSignal: step.waiting_for_signal
        ? {
            name: step.waiting_for_signal.name,
            factKey: step.waiting_for_signal.fact_key,
            since: fromTimestamp(step.waiting_for_signal.since),
            timeoutAt: fromTimestamp(step.waiting_for_signal.timeout_at),
          }
        : null,
    })),
    children: (run.children || []).map((child) => ({
      childRunId: child.child_run_id,
      factKey: child.fact_key,
      opId: child.op_id,
      status: enumName(child.status, 'RUN_STATUS_'),
      parentClosePolicy: enumName(child.parent_close_policy, 'PARENT_CLOSE_POLICY_'),
    })),
    finalSnapshotId: run.final_snapshot_id || null,
    finalSnapshot: fromValue(run.final_snapshot),
    reason: run.reason || null,
    error: errorDetail(run.error),
    headSeq: Number(run.head_seq || 0),
    // The run's input (null when started without one; undefined from an engine that does not say).
    input: fromValue(run.input),
    labels: { ...(run.labels || {}) },
    // For a rerun: the run it reran and the step it reran from; for any run, its reruns (oldest first).
    rerunOfRunId: run.rerun_of_run_id || null,
    rerunFromStepId: run.rerun_from_step_id || null,
    reruns: [...(run.reruns || [])],
  };
}

function toTimestamp(when) {
  const millis = when instanceof Date ? when.getTime() : new Date(when).getTime();
  if (Number.isNaN(millis)) throw new TypeError(`not a time: ${when}`);
  return { seconds: String(Math.floor(millis / 1000)), nanos: (((millis % 1000) + 1000) % 1000) * 1e6 };
}

const LINEAGE = { true: 'RUN_LINEAGE_TOP_LEVEL', false: 'RUN_LINEAGE_CHILDREN' };

/**
 * A google.protobuf.Duration from milliseconds (a number), a proto-JSON duration ('1.5s'), or a
 * {seconds, nanos} object; undefined stays undefined (the field is left unset).
 */
function toDuration(value, what = 'duration') {
  if (value === undefined || value === null) return undefined;
  if (typeof value === 'object') return { seconds: String(value.seconds ?? 0), nanos: value.nanos ?? 0 };
  let millis = value;
  if (typeof value === 'string') {
    const match = /^(\d+(?:\.\d{1,9})?)s$/.exec(value.trim());
    if (!match) throw new TypeError(`${what} must be milliseconds or a duration like '1.5s', got ${JSON.stringify(value)}`);
    millis = Number(match[1]) * 1000;
  }
  if (typeof millis !== 'number' || !Number.isFinite(millis) || millis < 0) {
    throw new TypeError(`${what} must be a non-negative number of milliseconds, got ${value}`);
  }
  const nanosTotal = Math.round(millis * 1e6);
  return { seconds: String(Math.floor(nanosTotal / 1e9)), nanos: nanosTotal % 1e9 };
}

/**
 * A RunConfig from {executionMode: 'live' | 'replay', replayOfRunId, retryPolicy: {maxAttempts,
 * initialBackoff, maxBackoff, multiplier}} (snake_case too; backoffs in milliseconds or '1.5s').
 */
function toRunConfig(config) {
  const out = {};
  const mode = config.executionMode ?? config.execution_mode;
  if (mode) out.execution_mode = wireEnum(mode, 'EXECUTION_MODE_');
  const replayOf = config.replayOfRunId ?? config.replay_of_run_id;
  if (replayOf) out.replay_of_run_id = replayOf;
  const policy = config.retryPolicy ?? config.retry_policy;
  if (policy) {
    out.retry_policy = {
      max_attempts: policy.maxAttempts ?? policy.max_attempts ?? 0,
      initial_backoff: toDuration(policy.initialBackoff ?? policy.initial_backoff, 'initial_backoff'),
      max_backoff: toDuration(policy.maxBackoff ?? policy.max_backoff, 'max_backoff'),
      multiplier: policy.multiplier ?? 0,
    };
  }
  return out;
}

// A step's (or single op's) task queue and timeouts, given snake_case or camelCase; absent ones unset.
function remoteFields(spec) {
  const fields = {};
  const queue = spec.task_queue ?? spec.taskQueue;
  if (queue) fields.task_queue = queue;
  for (const [wire, camel] of [
    ['start_to_close_timeout', 'startToCloseTimeout'],
    ['heartbeat_timeout', 'heartbeatTimeout'],
    ['schedule_to_start_timeout', 'scheduleToStartTimeout'],
  ]) {
    const duration = toDuration(spec[wire] ?? spec[camel], wire);
    if (duration !== undefined) fields[wire] = duration;
  }
  return fields;
}

function toPipeline(pipeline) {
  const steps = pipeline.steps || [];
  return {
    pipeline_id: pipeline.pipeline_id ?? pipeline.pipelineId,
    pipeline_version: pipeline.pipeline_version ?? pipeline.pipelineVersion ?? '',
    steps: steps.map((step) => {
      const config = step.op_config ?? step.opConfig;
      return {
        step_id: step.step_id ?? step.stepId,
        op_id: step.op_id ?? step.opId,
        op_version: step.op_version ?? step.opVersion ?? '',
        op_config: config === undefined ? undefined : toValue(config),
        depends_on: step.depends_on ?? step.dependsOn ?? [],
        ...remoteFields(step),
      };
    }),
  };
}

const TERMINAL = new Set(['completed', 'failed', 'canceled']);

// ---- the client -------------------------------------------------------------------------------------

/** A client of EngineService: one promise-returning method per RPC, watchRun as an async iterator. */
class KeelClient {
  constructor(address = process.env.KEEL_ENGINE || DEFAULT_ENGINE, options = {}) {
    const EngineService = loadEngineService();
    this.deadlineMs = options.deadlineMs ?? DEFAULT_DEADLINE_MS;
    this.metadata = new grpc.Metadata();
    if (options.token) this.metadata.set('authorization', `Bearer ${options.token}`);
    this.stub = new EngineService(address, options.credentials || grpc.credentials.createInsecure(), {
      'grpc.service_config': JSON.stringify(SERVICE_CONFIG),
      'grpc.enable_retries': 1,
    });
  }

  close() {
    this.stub.close();
  }

  _unary(method, request, deadlineMs = this.deadlineMs) {
    const options = deadlineMs == null ? {} : { deadline: new Date(Date.now() + deadlineMs) };
    return new Promise((resolve, reject) => {
      this.stub[method](request, this.metadata, options, (error, response) => {
        if (error) reject(keelError(error));
        else resolve(response);
      });
    });
  }

  /**
   * Starts a run of `pipeline` ({pipeline_id, steps: [{step_id, op_id, op_config, depends_on}]}) or of `op`.
   * A step (or the op, with `taskQueue`) may name a `task_queue`, executed by a worker (see worker.js),
   * and timeouts (`start_to_close_timeout`, `heartbeat_timeout`, `schedule_to_start_timeout`: milliseconds
   * or '1.5s'). `labels` ({key: value}, Kubernetes label rules) are recorded with the start; listRuns
   * finds runs by them. `runConfig` ({executionMode: 'replay', replayOfRunId, retryPolicy: {maxAttempts, ...}})
   * says how the run executes. `signals` ([{name, payload, signalId?}]) are in the run's inbox before it starts;
   * a run that exists already gets each of them once.
   */
  async startRun({ pipeline, op, opVersion = '', opConfig, input, context, runId, wait = false, deadlineMs, labels, signals, runConfig, ...remote } = {}) {
    const request = { run_id: runId || newRunId(), wait, labels: { ...(labels || {}) } };
    if (runConfig) request.run_config = toRunConfig(runConfig);
    request.signals = (signals || []).map((signal) => ({
      name: signal.name,
      payload: toValue(signal.payload ?? null),
      signal_id: signal.signalId ?? signal.signal_id ?? '',
    }));
    if (pipeline) request.pipeline = toPipeline(pipeline);
    else {
      request.op = {
        op_id: op,
        op_version: opVersion,
        op_config: opConfig === undefined ? undefined : toValue(opConfig),
        ...remoteFields(remote),
      };
    }
    if (input !== undefined) request.input = toValue(input);
    if (context !== undefined) request.initial_context = toValue(context);
    const response = await this._unary('StartRun', request, deadlineMs ?? (wait ? null : this.deadlineMs));
    return {
      runId: response.run_id,
      manifestId: response.manifest_id,
      created: Boolean(response.created),
      run: toRun(response.run),
    };
  }

  /**
   * Sends the signal `name` with a JSON `payload` to a run; a wait of the run (keel.wait_signal) consumes it.
   * Without `signalId` the client picks a UUID, so a retried call delivers the signal once; an id the run
   * holds already answers {created: false}. An ended run rejects with code `run_terminal`.
   */
  async signalRun(runId, name, payload = null, { signalId, deadlineMs } = {}) {
    const request = { run_id: runId, name, payload: toValue(payload), signal_id: signalId || randomUUID() };
    const response = await this._unary('SignalRun', request, deadlineMs ?? this.deadlineMs);
    return { signalId: response.signal_id, created: Boolean(response.created), inboxSeq: Number(response.inbox_seq || 0) };
  }

  /** The run with its steps, attempts, children and final snapshot. */
  async getRun(runId) {
    return toRun((await this._unary('GetRun', { run_id: runId })).run);
  }

  /** Blocks until the run is terminal (or `maxWaitMs` passes), without polling. */
  async awaitRun(runId, { maxWaitMs } = {}) {
    const request = { run_id: runId };
    let deadlineMs = null;
    if (maxWaitMs != null) {
      request.timeout = { seconds: String(Math.floor(maxWaitMs / 1000)), nanos: (maxWaitMs % 1000) * 1e6 };
      deadlineMs = maxWaitMs + this.deadlineMs;
    }
    const response = await this._unary('AwaitRun', request, deadlineMs);
    return { run: toRun(response.run), done: Boolean(response.done) };
  }

  /**
   * One page of runs, newest first: optionally only those with one of `statuses`, of `pipelineId`,
   * carrying every one of `labels`, started in [startedAfter, startedBefore) (Dates or ISO strings),
   * top-level (`topLevel: true`) or children (`topLevel: false`), spawned by `parentRunId`, and that
   * lasted from `minDuration` to `maxDuration`, both included (milliseconds or a duration like
   * '1.5s'; a terminal run from its start to its end, a running one until now). A min above the max
   * is rejected by the engine with `invalid_duration`.
   */
  async listRuns({
    statuses = [],
    pageSize = 0,
    pageToken = '',
    pipelineId = '',
    labels = {},
    startedAfter,
    startedBefore,
    topLevel,
    parentRunId = '',
    minDuration,
    maxDuration,
  } = {}) {
    const request = {
      statuses: statuses.map((status) => wireEnum(status, 'RUN_STATUS_')),
      page_size: pageSize,
      page_token: pageToken,
      pipeline_id: pipelineId,
      labels: { ...labels },
      parent_run_id: parentRunId,
    };
    if (startedAfter != null) request.started_after = toTimestamp(startedAfter);
    if (startedBefore != null) request.started_before = toTimestamp(startedBefore);
    if (topLevel != null) request.lineage = LINEAGE[Boolean(topLevel)];
    if (minDuration != null) request.min_duration = toDuration(minDuration, 'minDuration');
    if (maxDuration != null) request.max_duration = toDuration(maxDuration, 'maxDuration');
    const response = await this._unary('ListRuns', request);
    return {
      runs: (response.runs || []).map((run) => ({
        runId: run.run_id,
        status: enumName(run.status, 'RUN_STATUS_'),
        createdAt: fromTimestamp(run.created_at),
        updatedAt: fromTimestamp(run.updated_at),
        headSeq: Number(run.head_seq || 0),
        pipelineId: run.pipeline_id || '',
        labels: { ...(run.labels || {}) },
        parentRunId: run.parent_run_id || null,
      })),
      nextPageToken: response.next_page_token || null,
    };
  }

  /** The run's events as they happen (after `afterSeq`); the iteration ends after the terminal event. */
  async *watchRun(runId, { afterSeq = 0 } = {}) {
    const call = this.stub.WatchRun({ run_id: runId, after_seq: String(afterSeq) }, this.metadata);
    try {
      for await (const message of call) {
        const event = message.event;
        yield {
          seq: Number(event.seq),
          type: event.type,
          data: fromStruct(event.data),
          recordedAt: fromTimestamp(event.recorded_at),
        };
      }
    } catch (error) {
      throw error.code !== undefined ? keelError(error) : error;
    } finally {
      call.cancel();
    }
  }

  /** Moves a run to `target` ('completed', 'failed', 'canceled', or 'TERMINAL_TARGET_CANCELED', ...) exactly once. */
  async terminalize(runId, target, reason = '') {
    const response = await this._unary('Terminalize', {
      run_id: runId,
      target: wireEnum(target, 'TERMINAL_TARGET_'),
      reason,
    });
    return {
      outcome: enumName(response.outcome, 'TERMINALIZE_OUTCOME_'),
      status: enumName(response.status, 'RUN_STATUS_'),
    };
  }

  /**
   * Starts a new run of a terminal run that executes `fromStepId` and the steps depending on it again
   * and reuses every other step the run completed. `runIdNew` (default: a new UUIDv7, `newRunId`) makes it idempotent.
   */
  async rerunRun(runId, fromStepId, { runIdNew } = {}) {
    const response = await this._unary('RerunRun', {
      run_id: runId,
      from_step_id: fromStepId,
      run_id_new: runIdNew || newRunId(),
    });
    return { runId: response.run_id, created: Boolean(response.created), run: toRun(response.run) };
  }

  /** Deletes a terminal top-level run now, with the runs it spawned and every stream they own. */
  async deleteRun(runId) {
    const response = await this._unary('DeleteRun', { run_id: runId });
    return { runIds: [...(response.deleted_run_ids || [])], streams: Number(response.deleted_streams || 0) };
  }

  /** Makes the engine drive a run nobody drives. */
  async resumeRun(runId) {
    const response = await this._unary('ResumeRun', { run_id: runId });
    return { run: toRun(response.run), resumed: Boolean(response.resumed) };
  }

  /** Spawns a child run of `parentRunId` named by `factKey` (spawning twice yields the same child). */
  async spawnChild({ parentRunId, factKey, op, opVersion = '', opConfig, input, context, parentClosePolicy = 'cancel' }) {
    const request = {
      kind: 'child_run_spawn_v1',
      parent_run_id: parentRunId,
      fact_key: factKey,
      op_id: op,
      op_version: opVersion,
      parent_close_policy: wireEnum(parentClosePolicy, 'PARENT_CLOSE_POLICY_'),
    };
    if (opConfig !== undefined) request.op_config = toValue(opConfig);
    if (input !== undefined) request.input = toValue(input);
    if (context !== undefined) request.initial_context = toValue(context);
    const response = await this._unary('SpawnChild', request);
    return {
      parentRunId: response.parent_run_id,
      childRunId: response.child_run_id,
      childManifestId: response.child_manifest_id,
    };
  }

  /**
   * Waits for a child run to finish and returns its status and final snapshot. With
   * `parentRunId`, a child whose spawn was interrupted before it started is started from the
   * spawn its parent recorded.
   */
  async awaitChild(childRunId, childManifestId = '', { parentRunId = '' } = {}) {
    const response = await this._unary(
      'AwaitChild',
      {
        kind: 'child_run_await_v1',
        child_run_id: childRunId,
        child_manifest_id: childManifestId,
        parent_run_id: parentRunId,
      },
      null,
    );
    return {
      childRunId: response.child_run_id,
      status: enumName(response.status, 'RUN_STATUS_'),
      finalSnapshotId: response.final_snapshot_id || null,
      finalSnapshot: fromValue(response.final_snapshot),
    };
  }

  /** The task queues (WorkerService.ListQueues): backlog, tasks running, and the workers seen polling in the last minute. */
  async listQueues() {
    if (!this.workerStub) {
      // WorkerService is served on the engine's port: the same channel carries it.
      const WorkerService = loadWorkerService();
      this.workerStub = new WorkerService('unused', grpc.credentials.createInsecure(), { channelOverride: this.stub.getChannel() });
    }
    const response = await new Promise((resolve, reject) => {
      const deadline = new Date(Date.now() + this.deadlineMs);
      this.workerStub.ListQueues({}, this.metadata, { deadline }, (error, answer) => (error ? reject(keelError(error)) : resolve(answer)));
    });
    return (response.queues || []).map((queue) => ({
      taskQueue: queue.task_queue,
      backlog: Number(queue.backlog || 0),
      running: Number(queue.running || 0),
      workers: (queue.workers || []).map((worker) => ({
        workerId: worker.worker_id,
        lastSeen: fromTimestamp(worker.last_seen),
        ops: (worker.ops || []).map((op) => ({ opId: op.op_id, opVersion: op.op_version })),
      })),
    }));
  }

  /** The ops the engine can run, with their versions. */
  async listOps() {
    const response = await this._unary('ListOps', {});
    return (response.ops || []).map((op) => ({
      opId: op.op_id,
      opVersion: op.op_version,
      description: op.description,
      // Set for an op declared by a worker polling this queue; '' for the engine's own ops.
      taskQueue: op.task_queue || '',
    }));
  }
}

module.exports = { KeelClient, KeelError, TERMINAL, newRunId, fromValue, toValue, toDuration, keelError, loadEngineService, loadWorkerService };
