import net from 'node:net';
import { EventEmitter } from 'node:events';
import { QmpClosedError, QmpError, QmpTimeoutError } from '../errors.js';
import { sleep } from '../util/sleep.js';

/**
 * A small typed QMP client. Written by hand: the npm QMP clients are
 * unmaintained and none matches responses by id or surfaces a closed socket
 * as an error (they hang), which a checkpointer pausing a VM cannot afford.
 *
 * Protocol: QEMU sends a greeting, we send qmp_capabilities, then each
 * command carries an `id` echoed in its `return`/`error`; lines without an id
 * are asynchronous `event`s.
 */

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

export interface QmpGreeting {
  QMP: { version: { qemu: { major: number; minor: number; micro: number }; package: string }; capabilities: string[] };
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout | undefined;
}

export interface QmpConnectOptions {
  /** Give up connecting (and waiting for the greeting) after this long. */
  timeoutMs?: number;
  /** Default per-command timeout. */
  commandTimeoutMs?: number;
  /** Shown in error messages, e.g. the VM name. */
  label?: string;
}

export class QmpClient extends EventEmitter {
  private socket: net.Socket;
  private buffer = '';
  private nextId = 1;
  private pending = new Map<string, Pending>();
  private closedError: Error | undefined;
  readonly greeting: QmpGreeting;
  private readonly label: string;
  private readonly commandTimeoutMs: number;

  private constructor(socket: net.Socket, greeting: QmpGreeting, label: string, commandTimeoutMs: number, rest: string) {
    super();
    this.socket = socket;
    this.greeting = greeting;
    this.label = label;
    this.commandTimeoutMs = commandTimeoutMs;
    this.buffer = rest;
    socket.on('data', (chunk: Buffer) => this.onData(chunk.toString('utf8')));
    socket.on('error', (err) => this.fail(new QmpClosedError(`QMP connection to ${label} failed: ${err.message}`, { cause: err })));
    socket.on('close', () => this.fail(new QmpClosedError(`QMP connection to ${label} closed (QEMU exited?)`)));
    if (rest) this.onData('');
  }

  /** Connect to a QMP unix socket path (or "host:port"), read the greeting, negotiate capabilities. */
  static async connect(address: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? 5000;
    const label = opts.label ?? address;
    const { socket, greeting, rest } = await new Promise<{ socket: net.Socket; greeting: QmpGreeting; rest: string }>((resolve, reject) => {
      const tcp = /^[^/]+:\d+$/.exec(address);
      const socket = tcp ? net.connect(Number(address.split(':').pop()), address.slice(0, address.lastIndexOf(':'))) : net.connect(address);
      let buf = '';
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new QmpTimeoutError(`no QMP greeting from ${label} within ${timeoutMs} ms`));
      }, timeoutMs);
      const onError = (err: Error) => {
        clearTimeout(timer);
        reject(new QmpClosedError(`cannot connect to QMP of ${label} at ${address}: ${err.message}`, { cause: err }));
      };
      socket.once('error', onError);
      socket.once('close', () => onError(new QmpClosedError('socket closed before greeting')));
      const onData = (chunk: Buffer) => {
        buf += chunk.toString('utf8');
        const nl = buf.indexOf('\n');
        if (nl < 0) return;
        clearTimeout(timer);
        socket.off('data', onData);
        socket.removeAllListeners('error');
        socket.removeAllListeners('close');
        try {
          const greeting = JSON.parse(buf.slice(0, nl)) as QmpGreeting;
          if (!greeting.QMP) throw new QmpError(`not a QMP greeting: ${buf.slice(0, nl)}`);
          resolve({ socket, greeting, rest: buf.slice(nl + 1) });
        } catch (err) {
          socket.destroy();
          reject(new QmpError(`bad QMP greeting from ${label}: ${(err as Error).message}`));
        }
      };
      socket.on('data', onData);
    });
    const client = new QmpClient(socket, greeting, label, opts.commandTimeoutMs ?? 10_000, rest);
    await client.execute('qmp_capabilities');
    return client;
  }

  /** Run a QMP command; resolves with its `return` value, rejects with QmpError / QmpTimeoutError / QmpClosedError. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: { timeoutMs?: number } = {}): Promise<T> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = `h${this.nextId++}`;
    const timeoutMs = opts.timeoutMs ?? this.commandTimeoutMs;
    return new Promise<T>((resolve, reject) => {
      const entry: Pending = {
        command,
        resolve: resolve as (v: unknown) => void,
        reject,
        timer: timeoutMs > 0 ? setTimeout(() => {
          this.pending.delete(id);
          reject(new QmpTimeoutError(`QMP command ${command} to ${this.label} timed out after ${timeoutMs} ms`));
        }, timeoutMs) : undefined,
      };
      this.pending.set(id, entry);
      const msg = JSON.stringify(args === undefined ? { execute: command, id } : { execute: command, arguments: args, id });
      this.socket.write(msg + '\n');
    });
  }

  /** Resolve on the next event named `name` (optionally matching a predicate). */
  waitEvent(name: string, timeoutMs = 10_000, match?: (ev: QmpEvent) => boolean): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      if (this.closedError) return reject(this.closedError);
      const onEvent = (ev: QmpEvent) => {
        if (ev.event !== name || (match && !match(ev))) return;
        cleanup();
        resolve(ev);
      };
      const onClose = (err: Error) => { cleanup(); reject(err); };
      const timer = setTimeout(() => { cleanup(); reject(new QmpTimeoutError(`no ${name} event from ${this.label} within ${timeoutMs} ms`)); }, timeoutMs);
      const cleanup = () => { clearTimeout(timer); this.off('event', onEvent); this.off('closed', onClose); };
      this.on('event', onEvent);
      this.on('closed', onClose);
    });
  }

  get closed(): boolean {
    return this.closedError !== undefined;
  }

  close(): void {
    this.socket.destroy();
    this.fail(new QmpClosedError(`QMP connection to ${this.label} closed by client`));
  }

  private onData(text: string): void {
    this.buffer += text;
    let nl: number;
    while ((nl = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (!line) continue;
      let msg: { id?: string; return?: unknown; error?: { class: string; desc: string }; event?: string };
      try {
        msg = JSON.parse(line);
      } catch {
        continue; // QEMU never sends partial JSON lines; ignore noise rather than kill the session
      }
      if (msg.event) {
        this.emit('event', msg as QmpEvent);
        continue;
      }
      if (msg.id === undefined) continue;
      const p = this.pending.get(msg.id);
      if (!p) continue;
      this.pending.delete(msg.id);
      if (p.timer) clearTimeout(p.timer);
      if (msg.error) p.reject(new QmpError(`QMP ${p.command} on ${this.label} failed: ${msg.error.desc}`, msg.error.class));
      else p.resolve(msg.return);
    }
  }

  private fail(err: Error): void {
    if (this.closedError) return;
    this.closedError = err;
    for (const [, p] of this.pending) {
      if (p.timer) clearTimeout(p.timer);
      p.reject(err);
    }
    this.pending.clear();
    this.emit('closed', err);
  }
}

/** Retry connecting until the socket exists and answers (QEMU creates it a little after spawn). */
export async function connectWhenReady(address: string, opts: QmpConnectOptions & { deadlineMs?: number; isAlive?: () => boolean } = {}): Promise<QmpClient> {
  const deadline = Date.now() + (opts.deadlineMs ?? 10_000);
  let lastErr: unknown;
  while (Date.now() < deadline) {
    if (opts.isAlive && !opts.isAlive()) break;
    try {
      return await QmpClient.connect(address, opts);
    } catch (err) {
      lastErr = err;
      await sleep(10);
    }
  }
  throw new QmpTimeoutError(`QMP socket ${address} of ${opts.label ?? 'QEMU'} did not answer: ${(lastErr as Error)?.message ?? 'process exited'}`);
}
