import { RestoreError } from '../errors.js';
import type { StoreMeta } from '../protocol/index.js';
import { vmLog } from '../util/log.js';
import { MissingPageHandler } from '../tracker/index.js';
import { sleep } from '../util/sleep.js';

const PAGE = 4096;
/** Pages fetched around each fault: the paper saw strong spatial locality. */
const FAULT_WINDOW_PAGES = 16;
/** After a fault, the surrounding region is prefetched before anything else. */
const NEIGHBOURHOOD_BYTES = 2 * 1024 * 1024;
/** Background prefetch unit, and how many such requests are in flight at once. */
const PREFETCH_BYTES = 2 * 1024 * 1024;
const PREFETCH_DEPTH = 4;
const FETCH_RETRIES = 3;
/** With `reconnect`: how long a fetch keeps reconnecting (a standby store taking the directory over takes seconds). */
const RECONNECT_BUDGET_MS = 30_000;

export interface PagerStats {
  faults: number;
  faultPagesFetched: number;
  pagesPrefetched: number;
  bytesFetched: number;
  pagesTotal: number;
  pagesPresent: number;
  /** ms from start until every page was present (null while incomplete). */
  completeMs: number | null;
  /** Slowest fault service (fetch + fill), ms. */
  maxFaultMs: number;
  prefetch: boolean;
}

/** Where the pager reads guest pages: the store (network mode) or the image file (file mode into a restore shell). */
export interface PageSource {
  readPages(runs: { offset: number; length: number }[]): Promise<Buffer>;
  close(): Promise<void>;
}

export interface PagerOptions {
  vm: string;
  qemuPid: number;
  /** Connection for faults: a faulting vCPU must not wait behind background prefetch. */
  urgent: PageSource;
  /** Connection for background prefetch (may be the same when prefetch is off). */
  background: PageSource;
  meta: StoreMeta;
  prefetch: boolean;
  /** Page offsets to prefetch first, e.g. the pages the VM wrote most before it failed. */
  hotOffsets?: number[];
  onProgress?: (msg: string) => void;
  /**
   * A new connection, pinned to the same generation and epoch, for one that
   * failed: to the same store, or in a cluster to whichever store serves the
   * directory now. Absent: a failed fetch is retried on the same connection.
   */
  reconnect?: () => Promise<PageSource>;
}

type Role = 'urgent' | 'background';

/**
 * Network-mode memory for a restored VM (the paper's `odpf`): guest RAM is
 * shared memory registered for missing-page faults. Each fault is answered
 * with a window of pages fetched over a dedicated connection; meanwhile a
 * background stream fills the rest over a second one, several requests deep:
 * first the region around recent faults, then the hottest pages of the last
 * epochs, then everything else in order. Every page is requested exactly
 * once. A page that cannot be fetched is never replaced by zeros: after
 * retries the VM is stopped loudly (its QEMU killed), since a guest running on
 * a wrong page corrupts itself silently.
 */
export class NetworkPager {
  readonly stats: PagerStats;
  readonly done: Promise<PagerStats>;
  private readonly opts: PagerOptions;
  private readonly handler: MissingPageHandler;
  /** 0 missing, 1 requested, 2 present. */
  private readonly page: Uint8Array;
  private readonly t0 = performance.now();
  private stopped = false;
  private finished = false;
  private prefetchStarted = false;
  private cursor = 0;
  private readonly priority: number[] = [];
  private inflight = 0;
  private resolveDone!: (s: PagerStats) => void;
  private rejectDone!: (e: Error) => void;
  private wakePrefetch: (() => void) | undefined;
  private lastReport = 0;
  private readonly log;
  /** The connections in use; replaced when one fails and `reconnect` is given. */
  private readonly conns: Record<Role, PageSource>;
  private readonly reconnecting = new Map<PageSource, Promise<void>>();

  private constructor(opts: PagerOptions, handler: MissingPageHandler) {
    this.opts = opts;
    this.handler = handler;
    this.log = vmLog(opts.vm);
    this.conns = { urgent: opts.urgent, background: opts.background };
    const pages = opts.meta.ramSize / PAGE;
    this.page = new Uint8Array(pages);
    for (const off of opts.hotOffsets ?? []) this.priority.push(off);
    this.stats = { faults: 0, faultPagesFetched: 0, pagesPrefetched: 0, bytesFetched: 0, pagesTotal: pages, pagesPresent: 0, completeMs: null, maxFaultMs: 0, prefetch: opts.prefetch };
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
    void this.prefetchLoop().catch((err: Error) => this.fail(err));
  }

  /** Stop serving (the VM is being torn down). Resolves `done` with the stats so far. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.wakePrefetch?.();
    this.handler.close();
    if (!this.finished) {
      this.finished = true;
      this.resolveDone(this.stats);
    }
    // Stopping: the outcome is for whoever awaits `done`.
    await this.done.catch(() => undefined);
  }

  private fail(err: Error): void {
    if (this.finished) return;
    this.finished = true;
    this.stopped = true;
    this.log.error({ err: err.message }, 'page fetch failed for good: stopping the VM rather than let it run on missing memory');
    try {
      process.kill(this.opts.qemuPid, 'SIGKILL');
    } catch {
      /* already gone */
    }
    this.handler.close();
    this.rejectDone(err);
  }

  private complete(): boolean {
    return this.stats.pagesPresent === this.stats.pagesTotal;
  }

  private checkComplete(): void {
    if (!this.complete() || this.finished) return;
    this.finished = true;
    this.stopped = true;
    this.stats.completeMs = performance.now() - this.t0;
    this.report(true);
    // Free the range for write-protect tracking (protection of the new incarnation).
    this.handler.unregister();
    this.handler.close();
    this.wakePrefetch?.();
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
      const t = performance.now();
      const windows = new Set<number>();
      for (const off of faults) {
        this.stats.faults++;
        windows.add(Math.floor(off / (FAULT_WINDOW_PAGES * PAGE)) * FAULT_WINDOW_PAGES * PAGE);
        // The neighbourhood goes to the front of the background queue.
        this.priority.unshift(Math.floor(off / NEIGHBOURHOOD_BYTES) * NEIGHBOURHOOD_BYTES);
      }
      await Promise.all([...windows].map(async (w) => {
        this.stats.faultPagesFetched += await this.fetchAndFill('urgent', w, Math.min(w + FAULT_WINDOW_PAGES * PAGE, this.opts.meta.ramSize));
      }));
      this.stats.maxFaultMs = Math.max(this.stats.maxFaultMs, performance.now() - t);
      this.wakePrefetch?.();
      this.report();
      this.checkComplete();
    }
  }

  private async prefetchLoop(): Promise<void> {
    const running = new Set<Promise<void>>();
    while (!this.stopped) {
      while (running.size < PREFETCH_DEPTH && !this.stopped) {
        const range = this.nextPrefetchRange();
        if (!range) break;
        const p: Promise<void> = this.fetchAndFill('background', range[0], range[1]).then((n) => {
          this.stats.pagesPrefetched += n;
          running.delete(p);
          this.report();
          this.checkComplete();
        });
        running.add(p);
      }
      if (running.size === 0) {
        if (this.complete() || this.stopped) break;
        // Everything missing is already requested by the fault path: wait for news.
        await new Promise<void>((resolve) => { this.wakePrefetch = resolve; setTimeout(resolve, 50); });
        this.wakePrefetch = undefined;
        continue;
      }
      await Promise.race(running);
    }
    await Promise.all(running);
  }

  /** The next range with missing, unrequested pages: fault neighbourhoods, hot pages, then in order. */
  private nextPrefetchRange(): [number, number] | undefined {
    const size = this.opts.meta.ramSize;
    while (this.priority.length) {
      const start = this.priority.shift()!;
      const end = Math.min(start + PREFETCH_BYTES, size);
      for (let p = start / PAGE; p < end / PAGE; p++) if (this.page[p] === 0) return [start, end];
    }
    while (this.cursor < this.page.length && this.page[this.cursor] !== 0) this.cursor++;
    if (this.cursor >= this.page.length) return undefined;
    const start = this.cursor * PAGE;
    return [start, Math.min(start + PREFETCH_BYTES, size)];
  }

  /** Request the missing, unrequested pages of [start, end) and copy them in; returns pages filled. */
  /** The connections in use now (the caller closes them when memory is complete). */
  connections(): PageSource[] {
    return [...new Set([this.conns.urgent, this.conns.background])];
  }

  /** Replace `failed` (in every role it serves) with a new connection; concurrent callers share one attempt. */
  private async replace(failed: PageSource): Promise<void> {
    let p = this.reconnecting.get(failed);
    if (!p) {
      p = (async () => {
        const fresh = await this.opts.reconnect!();
        for (const role of ['urgent', 'background'] as const) if (this.conns[role] === failed) this.conns[role] = fresh;
        this.log.warn('store connection replaced; paging continues');
        // The old connection already failed: closing it only frees the socket.
        await failed.close().catch(() => undefined);
      })();
      this.reconnecting.set(failed, p);
      // A failed attempt may be tried again by the next fetch.
      p.catch(() => this.reconnecting.delete(failed));
    }
    return p;
  }

  private async fetchAndFill(role: Role, start: number, end: number): Promise<number> {
    const runs: { offset: number; length: number }[] = [];
    for (let p = start / PAGE; p < end / PAGE; p++) {
      if (this.page[p] !== 0) continue;
      this.page[p] = 1;
      const last = runs[runs.length - 1];
      if (last && last.offset + last.length === p * PAGE) last.length += PAGE;
      else runs.push({ offset: p * PAGE, length: PAGE });
    }
    if (runs.length === 0) return 0;
    let data: Buffer | undefined;
    let lastErr: unknown;
    const deadline = performance.now() + (this.opts.reconnect ? RECONNECT_BUDGET_MS : 0);
    let attempt = 0;
    while (!data && !this.stopped) {
      const client = this.conns[role];
      try {
        data = await client.readPages(runs);
      } catch (err) {
        lastErr = err;
        if (++attempt >= FETCH_RETRIES && performance.now() > deadline) break;
        await sleep(Math.min(50 * attempt, 500));
        if (this.opts.reconnect) await this.replace(client).catch((e: unknown) => { lastErr = e; });
      }
    }
    if (!data && this.stopped) return 0;
    if (!data) throw new RestoreError('HYDRA_RESTORE_PAGE_FETCH', `VM "${this.opts.vm}": cannot fetch guest pages ${start}..${end} from the store after ${attempt} tries${this.opts.reconnect ? ' and reconnections' : ''}: ${(lastErr as Error)?.message}`, { cause: lastErr });
    if (this.finished) return 0;
    let pos = 0;
    let filled = 0;
    for (const r of runs) {
      this.handler.fill(r.offset, data, pos, r.length);
      pos += r.length;
      for (let p = r.offset / PAGE; p < (r.offset + r.length) / PAGE; p++) this.page[p] = 2;
      filled += r.length / PAGE;
    }
    this.stats.pagesPresent += filled;
    this.stats.bytesFetched += pos;
    return filled;
  }
}
