// A minimal RESP2 client connection: one command at a time, each with its own deadline.
import net from 'node:net';
import { RedisClientError } from '../errors.js';

/**
 * Why not the `redis` or `ioredis` packages: both queue commands while
 * disconnected and resend them after reconnecting, and reconnect on their own
 * schedule. A client that measures a fail-over must know exactly which command
 * got which reply when, and must never apply an INCR twice; with one command
 * in flight, a deadline per command and reconnection under the caller's
 * control, RESP is a few dozen lines.
 */
export type RespValue = string | number | null | RespValue[] | RespErrorReply;

export class RespErrorReply {
  constructor(readonly message: string) {}
}

export function encodeCommand(args: (string | number)[]): Buffer {
  const parts = [`*${args.length}\r\n`];
  for (const a of args) {
    const s = String(a);
    parts.push(`$${Buffer.byteLength(s)}\r\n${s}\r\n`);
  }
  return Buffer.from(parts.join(''));
}

/** Parse one reply from `buf` at `off`: the value and the offset after it, or undefined if incomplete. */
export function parseReply(buf: Buffer, off = 0): { value: RespValue; next: number } | undefined {
  const eol = buf.indexOf('\r\n', off);
  if (eol < 0) return undefined;
  const type = String.fromCharCode(buf[off]!);
  const line = buf.toString('utf8', off + 1, eol);
  switch (type) {
    case '+': return { value: line, next: eol + 2 };
    case '-': return { value: new RespErrorReply(line), next: eol + 2 };
    case ':': return { value: Number(line), next: eol + 2 };
    case '$': {
      const len = Number(line);
      if (len < 0) return { value: null, next: eol + 2 };
      if (buf.length < eol + 2 + len + 2) return undefined;
      return { value: buf.toString('utf8', eol + 2, eol + 2 + len), next: eol + 2 + len + 2 };
    }
    case '*': {
      const n = Number(line);
      if (n < 0) return { value: null, next: eol + 2 };
      const items: RespValue[] = [];
      let next = eol + 2;
      for (let i = 0; i < n; i++) {
        const r = parseReply(buf, next);
        if (!r) return undefined;
        items.push(r.value);
        next = r.next;
      }
      return { value: items, next };
    }
    default:
      throw new RedisClientError('HYDRA_REDIS_PROTOCOL', `redis reply starts with ${JSON.stringify(type)}, not a RESP type`);
  }
}

/** One TCP connection to redis. `command` rejects on a timeout, a closed connection or an error reply. */
export class RespConnection {
  private buf: Buffer = Buffer.alloc(0);
  private waiter: { resolve: (v: RespValue) => void; reject: (e: Error) => void } | undefined;
  private closedError: Error | undefined;

  private constructor(private readonly socket: net.Socket, private readonly label: string) {
    socket.setNoDelay(true);
    socket.on('data', (d: Buffer) => this.onData(d));
    socket.on('error', (err) => this.fail(err));
    socket.on('close', () => this.fail(new RedisClientError('HYDRA_REDIS_CLOSED', `redis at ${label} closed the connection`)));
  }

  static connect(host: string, port: number, timeoutMs: number): Promise<RespConnection> {
    return new Promise((resolve, reject) => {
      const socket = net.connect({ host, port });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new RedisClientError('HYDRA_REDIS_TIMEOUT', `connecting to redis at ${host}:${port} took over ${timeoutMs} ms`));
      }, timeoutMs);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        resolve(new RespConnection(socket, `${host}:${port}`));
      });
      socket.once('error', (err) => {
        clearTimeout(timer);
        reject(new RedisClientError('HYDRA_REDIS_CONNECT', `connecting to redis at ${host}:${port} failed: ${err.message}`, { cause: err }));
      });
    });
  }

  command(args: (string | number)[], timeoutMs: number): Promise<RespValue> {
    if (this.closedError) return Promise.reject(this.closedError);
    if (this.waiter) return Promise.reject(new RedisClientError('HYDRA_REDIS_BUSY', 'one command at a time'));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = undefined;
        // The reply may still come: this connection cannot tell it apart from the next one's.
        this.close();
        reject(new RedisClientError('HYDRA_REDIS_TIMEOUT', `redis at ${this.label}: ${args[0]} got no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiter = {
        resolve: (v) => { clearTimeout(timer); resolve(v); },
        reject: (e) => { clearTimeout(timer); reject(e); },
      };
      this.socket.write(encodeCommand(args));
    });
  }

  close(): void {
    this.closedError ??= new RedisClientError('HYDRA_REDIS_CLOSED', `connection to redis at ${this.label} closed`);
    this.socket.destroy();
  }

  private onData(d: Buffer): void {
    this.buf = this.buf.length ? Buffer.concat([this.buf, d]) : d;
    const r = parseReply(this.buf);
    if (!r) return;
    this.buf = this.buf.subarray(r.next);
    const w = this.waiter;
    this.waiter = undefined;
    if (!w) return;
    if (r.value instanceof RespErrorReply) w.reject(new RedisClientError('HYDRA_REDIS_ERROR', `redis at ${this.label}: ${r.value.message}`));
    else w.resolve(r.value);
  }

  private fail(err: Error): void {
    this.closedError ??= err;
    const w = this.waiter;
    this.waiter = undefined;
    w?.reject(err);
  }
}

/** Run one command on a fresh connection (checks, reads after a restore). */
export async function redisOnce(host: string, port: number, args: (string | number)[], timeoutMs = 5000): Promise<RespValue> {
  const c = await RespConnection.connect(host, port, timeoutMs);
  try {
    return await c.command(args, timeoutMs);
  } finally {
    c.close();
  }
}
