// A client that watches a redis service across fail-overs: every reply recorded with its time.
import fs from 'node:fs';
import { RespConnection } from './resp.js';

/**
 * It alternates `INCR <counterKey>` and `SET <seqKey> <n>` (n = 1, 2, ... per
 * acknowledged SET) with at most one command in flight, and records each
 * outcome. The first command on every connection is `GET <counterKey>`: after
 * a fail-over, that is the value the restored service holds before this
 * client changes it. A reply is an acknowledgement: the service has the write. After a
 * connection error or a missed deadline it reconnects at once (then every
 * `retryMs`), without resending: a command whose reply never came may or may
 * not have been applied, so it is neither acknowledged nor counted lost.
 */
export interface WatcherOptions {
  host: string;
  port: number;
  /** JSONL file receiving every record as it happens. */
  out?: string;
  counterKey?: string;
  seqKey?: string;
  /** Deadline per command. Default 1000 ms. */
  timeoutMs?: number;
  /**
   * Deadline per connection attempt. Default 300 ms: a SYN the dead VM never
   * answered is retransmitted by the kernel only after 1 s, so a fresh attempt
   * sooner keeps that second out of the measured outage.
   */
  connectTimeoutMs?: number;
  /** Pause between reconnection attempts. Default 50 ms. */
  retryMs?: number;
  /** Pause between commands (0 = back to back). Default 5 ms. */
  pauseMs?: number;
}

export interface WatchRecord {
  /** Wall-clock time of the outcome, ms since the epoch (fractional). */
  t: number;
  op: 'incr' | 'set' | 'get' | 'connect';
  ok: boolean;
  /** INCR: the counter's new value; SET: the sequence number written; GET: the counter read. */
  value?: number;
  /** How long the command or connection attempt took. */
  ms: number;
  error?: string;
}

export class RedisWatcher {
  readonly records: WatchRecord[] = [];
  private running = false;
  private loop: Promise<void> | undefined;
  private conn: RespConnection | undefined;
  private out: number | undefined;
  private seq = 0;
  private readonly o: Required<Omit<WatcherOptions, 'out'>> & { out?: string };

  constructor(opts: WatcherOptions) {
    this.o = { counterKey: 'hydra:counter', seqKey: 'hydra:seq', timeoutMs: 1000, connectTimeoutMs: 300, retryMs: 50, pauseMs: 5, ...opts };
  }

  start(): this {
    if (this.running) return this;
    this.running = true;
    if (this.o.out) this.out = fs.openSync(this.o.out, 'a');
    this.loop = this.run();
    return this;
  }

  /** Stop after the command in flight (or at once if reconnecting); returns the records. */
  async stop(): Promise<WatchRecord[]> {
    this.running = false;
    await this.loop;
    this.conn?.close();
    if (this.out !== undefined) fs.closeSync(this.out);
    this.out = undefined;
    return this.records;
  }

  /** The newest acknowledged counter value (0 if none). */
  lastAckedCounter(): number {
    return lastAcked(this.records, 'incr') ?? 0;
  }

  private record(r: WatchRecord): void {
    this.records.push(r);
    if (this.out !== undefined) fs.writeSync(this.out, JSON.stringify(r) + '\n');
  }

  private async run(): Promise<void> {
    let incr = true;
    while (this.running) {
      if (!this.conn) {
        const t = performance.now();
        try {
          this.conn = await RespConnection.connect(this.o.host, this.o.port, this.o.connectTimeoutMs);
          this.record({ t: Date.now(), op: 'connect', ok: true, ms: performance.now() - t });
          const tg = performance.now();
          const v = await this.conn.command(['GET', this.o.counterKey], this.o.timeoutMs);
          this.record({ t: Date.now(), op: 'get', ok: true, value: v === null ? 0 : Number(v), ms: performance.now() - tg });
        } catch (err) {
          this.conn?.close();
          this.conn = undefined;
          this.record({ t: Date.now(), op: 'connect', ok: false, ms: performance.now() - t, error: (err as Error).message });
          await sleep(this.o.retryMs);
          continue;
        }
      }
      const op = incr ? 'incr' : 'set';
      const value = op === 'set' ? this.seq + 1 : undefined;
      const t = performance.now();
      try {
        const reply = await this.conn.command(op === 'incr' ? ['INCR', this.o.counterKey] : ['SET', this.o.seqKey, value!], this.o.timeoutMs);
        if (op === 'set') this.seq = value!;
        this.record({ t: Date.now(), op, ok: true, value: op === 'incr' ? Number(reply) : value, ms: performance.now() - t });
        incr = !incr;
        if (this.o.pauseMs > 0) await sleep(this.o.pauseMs);
      } catch (err) {
        this.record({ t: Date.now(), op, ok: false, ...(value !== undefined ? { value } : {}), ms: performance.now() - t, error: (err as Error).message });
        this.conn.close();
        this.conn = undefined;
      }
    }
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The value of the newest acknowledged `op` at or before `before` (ms since the epoch). */
export function lastAcked(records: WatchRecord[], op: 'incr' | 'set' | 'get', before = Infinity): number | undefined {
  for (let i = records.length - 1; i >= 0; i--) {
    const r = records[i]!;
    if (r.ok && r.op === op && r.t <= before) return r.value;
  }
  return undefined;
}

export interface WatchSummary {
  replies: number;
  failures: number;
  /** Longest time between two consecutive replies (ms), and when it began. */
  longestGapMs: number;
  longestGapFrom: number | null;
  /** From `killAt` to the first reply after it (ms); null if none came or no kill time was given. */
  firstReplyAfterKillMs: number | null;
  lastAckedCounter: number | null;
  lastAckedSeq: number | null;
}

/** Reads a JSONL file the watcher wrote. */
export function readWatchLog(file: string): WatchRecord[] {
  return fs.readFileSync(file, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l) as WatchRecord);
}

/** What a client saw: its longest outage and, given the kill time, how long until the service answered again. */
export function summarizeWatch(records: WatchRecord[], killAt?: number): WatchSummary {
  const replies = records.filter((r) => r.ok && r.op !== 'connect');
  let longestGapMs = 0;
  let longestGapFrom: number | null = null;
  for (let i = 1; i < replies.length; i++) {
    const gap = replies[i]!.t - replies[i - 1]!.t;
    if (gap > longestGapMs) {
      longestGapMs = gap;
      longestGapFrom = replies[i - 1]!.t;
    }
  }
  const after = killAt === undefined ? undefined : replies.find((r) => r.t > killAt);
  return {
    replies: replies.length,
    failures: records.filter((r) => !r.ok).length,
    longestGapMs,
    longestGapFrom,
    firstReplyAfterKillMs: after && killAt !== undefined ? after.t - killAt : null,
    lastAckedCounter: lastAcked(records, 'incr') ?? null,
    lastAckedSeq: lastAcked(records, 'set') ?? null,
  };
}

export interface LossReport {
  /** The newest counter value the client saw acknowledged before the kill. */
  ackedBeforeKill: number;
  /** The counter the restored service held: the first GET after the kill (before this client wrote again). */
  found: number | null;
  /** Acknowledged increments the restore lost (0 when found >= acked); null if nothing was read after the kill. */
  lostAcked: number | null;
}

/**
 * Without output commit a restore rolls the service back to the last
 * committed checkpoint, so increments acknowledged after it are lost; this
 * counts them.
 */
export function lossReport(records: WatchRecord[], killAt: number): LossReport {
  const ackedBeforeKill = lastAcked(records, 'incr', killAt) ?? 0;
  const found = records.find((r) => r.ok && r.op === 'get' && r.t > killAt)?.value ?? null;
  return { ackedBeforeKill, found, lostAcked: found === null ? null : Math.max(0, ackedBeforeKill - found) };
}
