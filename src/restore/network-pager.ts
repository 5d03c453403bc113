// Network-mode guest memory of a restored VM: demand faults plus a background stream of the image, straight from the receive buffers into guest RAM.
import { HydraError, ProtocolError, RestoreError } from '../errors.js';
import type { DecodedPages, PageRun, StoreMeta } from '../protocol/index.js';
import { vmLog } from '../util/log.js';
import { MissingPageHandler } from '../tracker/index.js';
import { sleep } from '../util/sleep.js';
import { GuestDelay } from './guest-delay.js';

const PAGE = 4096;
/** Pages fetched around each fault: the paper saw strong spatial locality. */
const FAULT_WINDOW_PAGES = 16;
/** After a fault, the surrounding region is prefetched before anything else. */
const NEIGHBOURHOOD_BYTES = 2 * 1024 * 1024;
/** Background request size: one PAGES reply frame (MAX_PAGES_DATA), so a reply is one buffer filled from in place. */
export const DEFAULT_BATCH_BYTES = 8 * 1024 * 1024;
/** Background connections, each with this many requests in flight: the store reads the next batch while one is on the wire. */
export const DEFAULT_STREAMS = 2;
const DEPTH_PER_STREAM = 2;
/** How long a lost store connection is retried (other addresses included) before the VM is stopped: a standby store taking the directory over takes seconds. */
export const DEFAULT_RECONNECT_MS = 30_000;

/** 0: missing, 1: requested, 2: present (per page). */
const MISSING = 0;
const REQUESTED = 1;
const PRESENT = 2;

export interface PagerStats {
  faults: number;
  faultPagesFetched: number;
  pagesPrefetched: number;
  bytesFetched: number;
  pagesTotal: number;
  pagesPresent: number;
  /** ms from start until every page was present (null while incomplete). */
  completeMs: number | null;
  /** ms from startPrefetch() until every page was present (null while incomplete or without prefetch). */
  streamMs: number | null;
  /** Slowest fault service (fetch + fill), ms. */
  maxFaultMs: number;
  prefetch: boolean;
  /** Background connections used. */
  streams: number;
  /** Store connections replaced after a failure (each may be to another store address). */
  reconnects: number;
  /** Time the background stream waited for the rate limit, ms. */
  throttledMs: number;
  /** Lowest rate the guard set, bytes/s (null: never engaged). */
  guardMinBytesPerS: number | null;
  /** Pages filled with zeros here because the image holds no data for them (never fetched). */
  zeroPagesFilled: number;
}

/**
 * Where the pager reads guest pages: a store connection (network mode) or
 * the image file (file mode into a restore shell). A source that can hand
 * out reply buffers without copying (readPageFrames, then recycle) is read that way.
 */
export interface PageSource {
  readPages(runs: PageRun[]): Promise<Buffer>;
  readPageFrames?(runs: readonly PageRun[]): Promise<DecodedPages[]>;
  recycle?(pages: readonly DecodedPages[]): void;
  /** For messages, e.g. the store's 'host:port'. */
  readonly address?: string;
  close(): Promise<void>;
}

/** A new source pinned to the image being restored, for one that failed; may be another store. */
export type PagerConnect = (why?: string) => Promise<PageSource>;

export interface PagerOptions {
  vm: string;
  qemuPid: number;
  /** Connection for faults: a faulting vCPU must not wait behind background prefetch. */
  urgent: PageSource;
  /** Connections for background prefetch (may be the urgent one when prefetch is off). */
  background: PageSource | PageSource[];
  /**
   * Replace a failed connection: a reader of the same generation pinned to
   * the same epoch (refused otherwise). Without it a lost connection stops the VM.
   */
  reconnect?: PagerConnect;
  /** How long reconnecting may take before the VM is stopped (default DEFAULT_RECONNECT_MS). */
  reconnectMs?: number;
  meta: StoreMeta;
  prefetch: boolean;
  /** Page offsets to prefetch first, e.g. the pages the VM wrote most before it failed. */
  hotOffsets?: number[];
  /**
   * The image's runs that may hold data (the store's data runs of the pinned
   * epoch); every other page is zeros and is filled here without a fetch.
   * Absent: every page is fetched.
   */
  dataRuns?: PageRun[];
  /** Background request size in bytes (default DEFAULT_BATCH_BYTES). */
  batchBytes?: number;
  /** Upper bound of the background stream, bytes per second (0 or absent: unlimited). Faults are never limited. */
  maxBytesPerS?: number;
  /**
   * Rate control by the guest's delay: while the VM's vCPUs wait for a CPU
   * more than this share of the time (e.g. 0.05), the stream slows down
   * (halved per 250 ms, never below minBytesPerS); while they do not, it
   * speeds up again. Absent: no control (only maxBytesPerS).
   */
  guard?: { maxDelay: number; minBytesPerS: number };
  onProgress?: (msg: string) => void;
}

/** One store connection of the pager: replaced in place when it fails. */
interface Conn {
  client: PageSource;
  /** Set while a replacement is being made; requests wait for it. */
  replacing: Promise<void> | null;
}

/**
 * Network-mode memory for a restored VM (the paper's `odpf`): guest RAM is
 * shared memory registered for missing-page faults. Each fault is answered
 * with a window of pages fetched over a dedicated connection; meanwhile a
 * background stream fills the rest over several others, several requests deep,
 * in batches of one reply frame each, copied into guest RAM (UFFDIO_COPY)
 * straight from the buffer the frame was received in: first the regions
 * around faults, then the hottest regions of the last epochs, then everything
 * else in order. Every page is requested once. A lost store connection is
 * replaced (the reconnect callback may pick another store address) and the
 * lost request asked again, only from a store pinned to the same epoch. A page
 * that cannot be fetched is never replaced by zeros: the VM is stopped loudly
 * (its QEMU killed) and `done` rejects, since a guest running on a wrong page
 * corrupts itself silently.
 */
export class NetworkPager {
  readonly stats: PagerStats;
  readonly done: Promise<PagerStats>;
  /** Why the pager stopped the VM (null while it has not). */
  failure: Error | null = null;
  private readonly opts: PagerOptions;
  private readonly handler: MissingPageHandler;
  private readonly page: Uint8Array;
  /** Per page, 1 when the image holds no data for it (zeros, filled without a fetch); null: fetch every page. */
  private readonly zero: Uint8Array | null;
  private readonly t0 = performance.now();
  private tStream = 0;
  private stopped = false;
  private finished = false;
  private prefetchStarted = false;
  private cursor = 0;
  /** Region starts to stream first (fault neighbourhoods at the front, then hot regions). */
  private readonly priority: number[] = [];
  private priorityHead = 0;
  private readonly urgent: Conn;
  private readonly background: Conn[];
  private readonly batch: number;
  private resolveDone!: (s: PagerStats) => void;
  private rejectDone!: (e: Error) => void;
  /** Stream slots waiting for something to request. */
  private readonly idle = new Set<() => void>();
  private lastReport = 0;
  /** Token bucket of the rate limit: when the next background request may start. */
  private nextSlot = 0;
  /** The stream's current limit, bytes/s (0: none): maxBytesPerS, lowered by the guard. */
  private rate = 0;
  private guardTimer: NodeJS.Timeout | null = null;
  private readonly log;

  private constructor(opts: PagerOptions, handler: MissingPageHandler) {
    this.opts = opts;
    this.handler = handler;
    this.log = vmLog(opts.vm);
    const pages = opts.meta.ramSize / PAGE;
    this.page = new Uint8Array(pages);
    this.zero = opts.dataRuns ? zeroMap(pages, opts.dataRuns) : null;
    for (const off of opts.hotOffsets ?? []) this.priority.push(off);
    this.urgent = { client: opts.urgent, replacing: null };
    this.background = (Array.isArray(opts.background) ? opts.background : [opts.background]).map((client) => (client === opts.urgent ? this.urgent : { client, replacing: null }));
    this.batch = Math.max(PAGE, Math.floor((opts.batchBytes ?? DEFAULT_BATCH_BYTES) / PAGE) * PAGE);
    this.stats = {
      faults: 0, faultPagesFetched: 0, pagesPrefetched: 0, bytesFetched: 0, pagesTotal: pages, pagesPresent: 0,
      completeMs: null, streamMs: null, maxFaultMs: 0, prefetch: opts.prefetch, streams: this.background.length, reconnects: 0, throttledMs: 0, guardMinBytesPerS: null, zeroPagesFilled: 0,
    };
    this.done = new Promise((resolve, reject) => { this.resolveDone = resolve; this.rejectDone = reject; });
    // Callers await `done` for the outcome; this only keeps an unawaited rejection from being unhandled.
    this.done.catch(() => undefined);
  }

  static async start(opts: PagerOptions): Promise<NetworkPager> {
    const handler = await MissingPageHandler.attach(opts.qemuPid);
    if (handler.ramSize !== opts.meta.ramSize) {
      handler.close();
      throw new RestoreError('HYDRA_RESTORE_BAD_CONFIG', `VM "${opts.vm}": guest RAM is ${handler.ramSize} bytes but the image holds ${opts.meta.ramSize}`);
    }
    const pager = new NetworkPager(opts, handler);
    void pager.faultLoop().catch((err: Error) => pager.fail(err));
    return pager;
  }

  /**
   * Begin the background stream. Called once the VM runs: before that, QEMU's
   * own faults while loading devices must not queue behind prefetch traffic.
   */
  startPrefetch(): void {
    if (!this.opts.prefetch || this.prefetchStarted || this.finished) return;
    this.prefetchStarted = true;
    this.tStream = performance.now();
    this.rate = this.opts.maxBytesPerS ?? 0;
    if (this.opts.guard) this.startGuard(this.opts.guard);
    for (const conn of this.background) {
      for (let i = 0; i < DEPTH_PER_STREAM; i++) void this.streamLoop(conn).catch((err: Error) => this.fail(err));
    }
  }

  /** Stop serving (the VM is being torn down). Resolves `done` with the stats so far. */
  async stop(): Promise<void> {
    this.stopGuard();
    this.stopped = true;
    this.wake();
    this.handler.close();
    if (!this.finished) {
      this.finished = true;
      this.resolveDone(this.stats);
    }
    // Stopping: the outcome is for whoever awaits `done`.
    await this.done.catch(() => undefined);
  }

  /** Every source the pager uses now (replacements included), for closing. */
  connections(): PageSource[] {
    return [...new Set([this.urgent.client, ...this.background.map((c) => c.client)])];
  }

  private fail(err: Error): void {
    if (this.finished) return;
    this.stopGuard();
    this.finished = true;
    this.stopped = true;
    this.failure = err;
    this.log.error({ err: err.message }, 'guest memory cannot be fetched: stopping the VM rather than let it run on missing memory; restore it again from the committed epoch');
    try {
      process.kill(this.opts.qemuPid, 'SIGKILL');
    } catch {
      /* already gone */
    }
    this.handler.close();
    this.wake();
    this.rejectDone(err);
  }

  private complete(): boolean {
    return this.stats.pagesPresent === this.stats.pagesTotal;
  }

  private stopGuard(): void {
    if (this.guardTimer) clearInterval(this.guardTimer);
    this.guardTimer = null;
  }

  private checkComplete(): void {
    if (!this.complete() || this.finished) return;
    this.stopGuard();
    this.finished = true;
    this.stopped = true;
    const t = performance.now();
    this.stats.completeMs = t - this.t0;
    if (this.prefetchStarted) this.stats.streamMs = t - this.tStream;
    this.report(true);
    // Free the range for write-protect tracking (protection of the new incarnation).
    this.handler.unregister();
    this.handler.close();
    this.wake();
    this.resolveDone(this.stats);
  }

  private report(force = false): void {
    const now = performance.now();
    if (!force && now - this.lastReport < 1000) return;
    this.lastReport = now;
    const s = this.stats;
    const pct = Math.floor((100 * s.pagesPresent) / s.pagesTotal);
    this.opts.onProgress?.(`memory of ${this.opts.vm}: ${pct}% present (${s.faults} faults served, ${s.pagesPrefetched} pages prefetched)${s.completeMs !== null ? `, complete after ${s.completeMs.toFixed(0)} ms` : ''}`);
  }

  private async faultLoop(): Promise<void> {
    while (!this.stopped) {
      const faults = await this.handler.waitFaults(100);
      if (this.stopped) break;
      if (faults.length === 0) continue;
      this.log.debug({ faults: faults.length, first: faults[0] }, 'page faults');
      const t = performance.now();
      const runs: PageRun[] = [];
      const windowBytes = FAULT_WINDOW_PAGES * PAGE;
      for (const off of faults) {
        this.stats.faults++;
        const w = Math.floor(off / windowBytes) * windowBytes;
        this.claim(w, Math.min(w + windowBytes, this.opts.meta.ramSize), runs);
        // The neighbourhood goes to the front of the background queue.
        this.priority.splice(this.priorityHead, 0, Math.floor(off / NEIGHBOURHOOD_BYTES) * NEIGHBOURHOOD_BYTES);
      }
      // A fault on a page already requested by the stream is woken by that fill.
      if (runs.length > 0) this.stats.faultPagesFetched += await this.fetchAndFill(this.urgent, runs);
      this.stats.maxFaultMs = Math.max(this.stats.maxFaultMs, performance.now() - t);
      this.wake();
      this.report();
      this.checkComplete();
    }
  }

  /** One of the background request slots: claim a batch, fetch it, fill it, until nothing is missing. */
  private async streamLoop(conn: Conn): Promise<void> {
    while (!this.stopped) {
      await this.throttle();
      if (this.stopped) return;
      const runs = this.nextBatch();
      if (runs.length === 0) {
        if (this.complete()) return;
        // Everything missing is already requested (by faults or other slots): wait for news.
        await new Promise<void>((resolve) => {
          const t = setTimeout(() => { this.idle.delete(resolve); resolve(); }, 50);
          this.idle.add(() => { clearTimeout(t); resolve(); });
        });
        continue;
      }
      this.stats.pagesPrefetched += await this.fetchAndFill(conn, runs);
      this.report();
      this.checkComplete();
    }
  }

  private wake(): void {
    const w = [...this.idle];
    this.idle.clear();
    for (const f of w) f();
  }

  /**
   * AIMD on the stream's rate from the vCPUs' run-queue wait: the stream
   * (with the store it keeps busy) competes with the guest for CPUs, and the
   * wait is the guest's loss. Contention from elsewhere slows the stream too:
   * it cannot tell whose CPU time it is, and the guest comes first.
   */
  private startGuard(g: { maxDelay: number; minBytesPerS: number }): void {
    const delay = new GuestDelay(this.opts.qemuPid);
    const max = this.opts.maxBytesPerS ?? 0;
    let current = max > 0 ? max : Infinity;
    let measured = 0;
    let lastBytes = this.stats.bytesFetched;
    let lastT = performance.now();
    delay.sample();
    this.guardTimer = setInterval(() => {
      const d = delay.sample();
      const t = performance.now();
      // What the stream actually did lately: the base the rate is cut from.
      const r = ((this.stats.bytesFetched - lastBytes) / (t - lastT)) * 1000;
      lastBytes = this.stats.bytesFetched;
      lastT = t;
      measured = Math.max(r, g.minBytesPerS);
      if (d === null) return;
      if (d > g.maxDelay) current = Math.max(g.minBytesPerS, Math.min(current, measured) / 2);
      else if (current !== Infinity) current = current * 1.25 + 8 * 1024 * 1024;
      if (max > 0 && current >= max) current = max;
      if (current === Infinity || (max === 0 && current > 64 * measured)) current = Infinity;
      this.rate = current === Infinity ? 0 : current;
      if (this.rate > 0) this.stats.guardMinBytesPerS = Math.min(this.stats.guardMinBytesPerS ?? Infinity, this.rate);
    }, 250);
    this.guardTimer.unref();
  }

  /** Wait for the rate limit (a token bucket of one batch). */
  private async throttle(): Promise<void> {
    const rate = this.rate;
    if (!(rate > 0)) return;
    const now = performance.now();
    const start = Math.max(now, this.nextSlot);
    this.nextSlot = start + (this.batch / rate) * 1000;
    if (start > now) {
      this.stats.throttledMs += start - now;
      await sleep(start - now);
    }
  }

  /**
   * Claim the missing pages of [start, end) (marked requested) and append them
   * as runs. Native scans of the page map (indexOf), no per-page loop; returns
   * the bytes claimed.
   */
  private claim(start: number, end: number, runs: PageRun[], budget = Infinity): number {
    const page = this.page;
    let p = start / PAGE;
    const last = end / PAGE;
    let claimed = 0;
    while (p < last && claimed < budget) {
      p = page.indexOf(MISSING, p);
      if (p < 0 || p >= last) break;
      const req = page.indexOf(REQUESTED, p);
      const pre = page.indexOf(PRESENT, p);
      let q = Math.min(last, req < 0 ? last : req, pre < 0 ? last : pre, p + Math.ceil((budget - claimed) / PAGE));
      if (q <= p) q = p + 1;
      page.fill(REQUESTED, p, q);
      const prev = runs[runs.length - 1];
      if (prev && prev.offset + prev.length === p * PAGE) prev.length += (q - p) * PAGE;
      else runs.push({ offset: p * PAGE, length: (q - p) * PAGE });
      claimed += (q - p) * PAGE;
      p = q;
    }
    return claimed;
  }

  /** The next background batch: fault neighbourhoods and hot regions first, then the rest in order. */
  private nextBatch(): PageRun[] {
    const size = this.opts.meta.ramSize;
    const runs: PageRun[] = [];
    let bytes = 0;
    while (bytes < this.batch && this.priorityHead < this.priority.length) {
      const start = this.priority[this.priorityHead]!;
      const end = Math.min(start + NEIGHBOURHOOD_BYTES, size);
      const got = this.claim(start, end, runs, this.batch - bytes);
      bytes += got;
      // A region only partly claimed (the batch filled up) stays at the head.
      if (bytes < this.batch || got === 0) this.priorityHead++;
    }
    if (this.priorityHead > 4096) {
      this.priority.splice(0, this.priorityHead);
      this.priorityHead = 0;
    }
    if (bytes < this.batch) {
      const c = this.page.indexOf(MISSING, this.cursor);
      this.cursor = c < 0 ? this.page.length : c;
      if (c >= 0) bytes += this.claim(c * PAGE, size, runs, this.batch - bytes);
    }
    return runs;
  }

  /**
   * Fetch claimed runs and copy them into guest RAM from the reply buffers.
   * A failed connection is replaced and the same runs asked again; returns
   * pages filled.
   */
  private async fetchAndFill(conn: Conn, runs: PageRun[]): Promise<number> {
    let zeroFilled = 0;
    if (this.zero) {
      const split = splitByZero(this.zero, runs);
      zeroFilled = this.fillZeros(split.zero);
      runs = split.data;
      if (runs.length === 0) return zeroFilled;
    }
    const { client, replies } = await this.fetch(conn, runs);
    try {
      return zeroFilled + this.fill(runs, replies);
    } finally {
      // Placed (or dropped): the reply buffers take the next replies.
      client.recycle?.(replies);
    }
  }

  /** Pages the image holds no data for: zeros from one shared buffer, no fetch. */
  private fillZeros(runs: PageRun[]): number {
    if (this.finished || runs.length === 0) return 0;
    const zeros = zeroBuffer();
    let filled = 0;
    for (const r of runs) {
      for (let off = r.offset; off < r.offset + r.length; off += zeros.length) {
        const len = Math.min(zeros.length, r.offset + r.length - off);
        this.handler.fill(off, zeros, 0, len);
      }
      this.page.fill(PRESENT, r.offset / PAGE, (r.offset + r.length) / PAGE);
      filled += r.length / PAGE;
    }
    this.stats.zeroPagesFilled += filled;
    this.stats.pagesPresent += filled;
    return filled;
  }

  private fill(runs: PageRun[], replies: DecodedPages[]): number {
    if (this.finished) return 0;
    checkReply(this.opts.vm, runs, replies);
    let filled = 0;
    for (const r of replies) {
      let pos = 0;
      for (const run of r.runs) {
        this.handler.fill(run.offset, r.data, pos, run.length);
        this.page.fill(PRESENT, run.offset / PAGE, (run.offset + run.length) / PAGE);
        pos += run.length;
        filled += run.length / PAGE;
      }
      this.stats.bytesFetched += pos;
    }
    this.stats.pagesPresent += filled;
    return filled;
  }

  private async fetch(conn: Conn, runs: PageRun[]): Promise<{ client: PageSource; replies: DecodedPages[] }> {
    const deadline = performance.now() + (this.opts.reconnectMs ?? DEFAULT_RECONNECT_MS);
    let lastErr: unknown;
    for (let attempt = 0; !this.finished; attempt++) {
      if (conn.replacing) await conn.replacing;
      const client = conn.client;
      try {
        const replies = client.readPageFrames ? await client.readPageFrames(runs) : [{ runs, data: await client.readPages(runs), dataOffset: 0 }];
        return { client, replies };
      } catch (err) {
        lastErr = err;
        this.log.debug({ err: (err as Error).message, attempt }, 'page fetch failed');
        if (this.finished) break;
        if (!retryable(err)) throw this.fetchError(runs, err, 'the store refused');
        if (performance.now() > deadline) break;
        // One replacement per failure of a connection; the other requests on it wait for that one.
        if (conn.client === client && !conn.replacing) conn.replacing = this.replace(conn, (err as Error).message, deadline);
        await conn.replacing;
        await sleep(Math.min(200, 10 * 2 ** attempt));
      }
    }
    throw this.fetchError(runs, lastErr, this.opts.reconnect ? 'no store could serve it' : 'no other store to ask');
  }

  /** Connect again (possibly to another store address) until `deadline`; a lasting failure stops the VM. */
  private async replace(conn: Conn, why: string, deadline: number): Promise<void> {
    const old = conn.client;
    // The failed connection is dead or lying: closing it is cleanup.
    void old.close().catch(() => undefined);
    try {
      if (!this.opts.reconnect) throw new RestoreError('HYDRA_RESTORE_PAGE_FETCH', `VM "${this.opts.vm}": cannot fetch guest pages: the connection to ${old.address ?? 'the page source'} failed (${why}) and no other store is known`);
      let lastErr: unknown;
      for (let attempt = 0; performance.now() < deadline && !this.finished; attempt++) {
        try {
          conn.client = await this.opts.reconnect(why);
          this.stats.reconnects++;
          this.log.warn({ from: old.address, to: conn.client.address, why }, 'store connection replaced while paging');
          return;
        } catch (err) {
          lastErr = err;
          // A store that serves another image (epoch moved, other generation) must never be read from.
          if (err instanceof HydraError && !retryable(err)) throw err;
          await sleep(Math.min(500, 50 * 2 ** attempt));
        }
      }
      throw new RestoreError('HYDRA_RESTORE_PAGE_FETCH', `VM "${this.opts.vm}": cannot fetch guest pages: no store answered within ${this.opts.reconnectMs ?? DEFAULT_RECONNECT_MS} ms after the connection to ${old.address ?? 'the page source'} failed (${why}): ${(lastErr as Error | undefined)?.message ?? 'stopped'}`, { cause: lastErr });
    } catch (err) {
      this.fail(err as Error);
    } finally {
      conn.replacing = null;
    }
  }

  private fetchError(runs: PageRun[], err: unknown, what: string): RestoreError {
    const first = runs[0]!;
    const last = runs[runs.length - 1]!;
    return new RestoreError('HYDRA_RESTORE_PAGE_FETCH', `VM "${this.opts.vm}": cannot fetch guest pages ${first.offset}..${last.offset + last.length} (${what}): ${(err as Error | undefined)?.message ?? 'pager stopped'}`, { cause: err });
  }
}

/**
 * Whether a failed read is worth another connection: the connection broke (or
 * a frame failed its checks, which ends the connection) — yes; the store
 * refused (epoch moved, no image, bad run) or a store serving another image
 * answered — never.
 */
function retryable(err: unknown): boolean {
  const code = err instanceof HydraError ? err.code : undefined;
  // A garbled or short reply (any protocol error) is worth asking again, on a fresh connection if need be.
  if (code === undefined || err instanceof ProtocolError) return true;
  return code === 'HYDRA_STORE_CONNECTION_LOST' || code === 'HYDRA_STORE_TIMEOUT' || code === 'HYDRA_RESTORE_STORE_UNREACHABLE';
}

/** The reply must carry exactly the runs asked for, in order: a page is only ever filled with the bytes of its own offset. */
function checkReply(vm: string, asked: readonly PageRun[], replies: readonly DecodedPages[]): void {
  let i = 0;
  let pos = asked[0]?.offset ?? 0;
  let left = asked[0]?.length ?? 0;
  for (const r of replies) {
    for (const run of r.runs) {
      let off = run.offset;
      let len = run.length;
      while (len > 0) {
        if (left === 0) {
          i++;
          if (i >= asked.length) break;
          pos = asked[i]!.offset;
          left = asked[i]!.length;
        }
        if (off !== pos || i >= asked.length) break;
        const k = Math.min(len, left);
        off += k;
        pos += k;
        len -= k;
        left -= k;
      }
      if (len > 0) throw new RestoreError('HYDRA_RESTORE_PAGE_FETCH', `VM "${vm}": the store answered with page run ${run.offset}+${run.length}, which was not asked for here`);
    }
  }
  if (left > 0 || i < asked.length - 1) throw new RestoreError('HYDRA_RESTORE_PAGE_FETCH', `VM "${vm}": the store's reply misses asked pages`);
}

let zeros: Buffer | undefined;
/** 2 MiB of zeros, shared by every pager of the process (only ever read). */
function zeroBuffer(): Buffer {
  zeros ??= Buffer.alloc(2 * 1024 * 1024);
  return zeros;
}

/** 1 for every page outside the data runs. */
function zeroMap(pages: number, dataRuns: readonly PageRun[]): Uint8Array {
  const z = new Uint8Array(pages).fill(1);
  for (const r of dataRuns) z.fill(0, Math.floor(r.offset / PAGE), Math.min(pages, Math.ceil((r.offset + r.length) / PAGE)));
  return z;
}

/** Split runs into the parts outside the data runs (zero) and inside them (data), in order; scans with indexOf, no per-page loop. */
export function splitByZero(zero: Uint8Array, runs: readonly PageRun[]): { zero: PageRun[]; data: PageRun[] } {
  const out = { zero: [] as PageRun[], data: [] as PageRun[] };
  for (const r of runs) {
    let p = r.offset / PAGE;
    const end = (r.offset + r.length) / PAGE;
    while (p < end) {
      const isZero = zero[p] === 1;
      let q = zero.indexOf(isZero ? 0 : 1, p);
      if (q < 0 || q > end) q = end;
      (isZero ? out.zero : out.data).push({ offset: p * PAGE, length: (q - p) * PAGE });
      p = q;
    }
  }
  return out;
}
