// TypeScript declarations for worker.js: a Keel worker for Node.js (keel.worker.v1.WorkerService).

import type { ChannelCredentials } from '@grpc/grpc-js';

/** Any JSON value (what travels as google.protobuf.Value). */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** What a transport is told about a call besides its request: enough to deduplicate it remotely. */
export interface CallInfo {
  namespace: string;
  factKey: string;
  runId: string;
  stepId: string;
  attempt: number;
  /** Grows with every claim of the step's tasks: (runId, stepId, attempt, fencing) names this execution. */
  fencing: number;
  /** Aborted when the task was asked to stop, its claim was lost or the worker handed it back. */
  signal: AbortSignal;
}

/** Performs the real I/O of `ctx.io.call(namespace, ...)`; its answer is recorded as a fact. */
export type Transport = (request: any, call: CallInfo) => Promise<Json> | Json;

/** `ctx.io`: calls become facts of the run, recorded before the handler sees their answer. */
export interface TaskIo {
  /**
   * The answer recorded in the run for `factKey`; else the transport's answer for `namespace`,
   * recorded first (RecordFact). An empty key rejects with OpFailure `missing_fact_key`.
   */
  call<T = any>(namespace: string, request: Json, factKey: string): Promise<T>;
}

/** What a handler sees besides its input. */
export interface TaskContext {
  runId: string;
  stepId: string;
  /** The attempt, from 0. */
  attempt: number;
  opId: string;
  opVersion: string;
  /** The step's op_config (null when it has none). */
  opConfig: any;
  /** The run's input (null when it has none). */
  input: any;
  /** The context the step starts from: the run's initial context plus the outputs of the steps it depends on. */
  context: Record<string, any>;
  taskQueue: string;
  workerId: string;
  fencing: number;
  /** The run replays another run: io.call serves that run's facts and calls nothing (else `replay_fact_missing`). */
  replay: boolean;
  /** When the engine made the task (null from an engine that does not say). */
  scheduledAt: Date | null;
  /** Aborted when the run asks the task to stop, the claim is lost, or the worker hands the task back. */
  signal: AbortSignal;
  /** True once a heartbeat answered that the run asked the task to stop. */
  readonly cancelRequested: boolean;
  io: TaskIo;
  /** Heartbeats now, with optional progress `details` (not recorded); heartbeats are also automatic. */
  heartbeat(details?: Json): Promise<{ cancelRequested: boolean }>;
}

/** An op this worker executes. */
export interface WorkerOp {
  id: string;
  /** Default '1'. */
  version?: string;
  description?: string;
  handler: (input: any, ctx: TaskContext) => Promise<any> | any;
}

/** TLS to the engine: PEM contents (Buffer or string) or file paths; `true` for the system's roots. */
export interface TlsOptions {
  ca?: Buffer | string;
  cert?: Buffer | string;
  key?: Buffer | string;
}

export interface Logger {
  info(message: string): void;
  warn(message: string): void;
  error(message: string): void;
}

export interface WorkerOptions {
  /** HOST:PORT of an engine (default $KEEL_ENGINE or 127.0.0.1:7070). */
  address?: string;
  /** The queue to poll (1 to 128 characters of [A-Za-z0-9._-]). */
  taskQueue: string;
  ops: WorkerOp[];
  /** One transport per io.call namespace. */
  transports?: Record<string, Transport>;
  /** Tasks executed at once (default 10). */
  concurrency?: number;
  /** Shown in ListQueues and on the attempts this worker ran (default host-pid-random). */
  workerId?: string;
  /** The engine's bearer token. */
  token?: string;
  tls?: true | TlsOptions;
  /** grpc-js channel credentials (instead of `tls`). */
  credentials?: ChannelCredentials;
  /** How long one PollTask waits for a task (default 20000). */
  pollWaitMs?: number;
  /** Heartbeat at least this often (default 10000; more often when the step's heartbeat timeout asks). */
  heartbeatEveryMs?: number;
  /** On shutdown, how long running tasks may take before they are handed back (default 30000). */
  shutdownGraceMs?: number;
  /** Where the worker logs (default console). */
  logger?: Logger;
}

/** Polls a task queue and executes the tasks of its ops. */
export class Worker {
  constructor(options: WorkerOptions);
  readonly address: string;
  readonly taskQueue: string;
  readonly workerId: string;
  readonly concurrency: number;
  /** Tasks executed now. */
  readonly running: number;
  /** Tasks this worker completed. */
  completed: number;
  /** Tasks this worker failed (handed back included). */
  failed: number;
  /** Polls and executes until shutdown() (by default also SIGTERM / SIGINT); resolves once stopped. */
  run(options?: { handleSignals?: boolean }): Promise<void>;
  /** Stops polling; running tasks get `graceMs`, then are handed back (FailTask, retryable worker_shutdown). */
  shutdown(options?: { graceMs?: number }): Promise<void>;
}

/** Throw from a handler to fail its attempt with a code of your own; `retryable` (default true) decides a retry. */
export class OpFailure extends Error {
  constructor(code: string, message: string, options?: { retryable?: boolean; details?: Record<string, Json> });
  code: string;
  retryable: boolean;
  details: Record<string, Json>;
}

/** The ErrorDetail (as sent by FailTask) that a thrown value becomes. */
export function failureOf(error: unknown): { code: string; category: string; retryable: boolean; message: string; details?: unknown };

export function loadWorkerService(): any;
