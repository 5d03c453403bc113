import { RestoreError } from '../errors.js';
import type { StoreClient, StoreMeta } from '../protocol/index.js';
import { vmLog } from '../util/log.js';
import { MissingPageHandler } from './page-fault-handler.js';

const PAGE = 4096;
/** Pages fetched around each fault: the paper saw strong spatial locality. */
const FAULT_WINDOW_PAGES = 16;
/** Background prefetch unit. */
const PREFETCH_BYTES = 2 * 1024 * 1024;
const FETCH_RETRIES = 3;

export interface PagerStats {
  faults: number;
  faultPagesFetched: number;
  pagesPrefetched: number;
  bytesFetched: number;
  pagesTotal: number;
  pagesPresent: number;
  /** ms from start until every page was present (null while incomplete). */
  completeMs: number | null;
  /** Fault service latency, ms. */
  maxFaultMs: number;
  prefetch: boolean;
}

export interface PagerOptions {
  vm: string;
  qemuPid: number;
  client: StoreClient;
  meta: StoreMeta;
  prefetch: boolean;
  /** Pages to prefetch first (offsets), e.g. the VM's hottest pages before failure. */
  hotOffsets?: number[];
  onProgress?: (msg: string) => void;
}

/**
 * Network-mode memory for a restored VM (the paper's `odpf`): guest RAM is
 * shared memory registered for missing-page faults; each fault is answered
 * with a window of pages fetched from the store, and while no fault waits the
 * rest streams in the background, so the working set arrives before it is
 * asked for. A page that cannot be fetched is never replaced by zeros: after
 * retries the VM is stopped loudly (its QEMU killed), since running on a wrong
 * page would corrupt the guest silently.
 */
export class NetworkPager {
  readonly stats: PagerStats;
  readonly done: Promise<PagerStats>;
  private readonly opts: PagerOptions;
  private readonly handler: MissingPageHandler;
  private readonly present: Uint8Array;
  private readonly t0 = performance.now();
  private stopped = false;
  private cursor = 0;
  private hot: number[];
  private resolveDone!: (s: PagerStats) => void;
  private rejectDone!: (e: Error) => void;
  private readonly log;

  private constructor(opts: PagerOptions, handler: MissingPageHandler) {
    this.opts = opts;
    this.handler = handler;
    this.log = vmLog(opts.vm);
    const pages = opts.meta.ramSize / PAGE;
    this.present = new Uint8Array(pages);
    this.hot = [...(opts.hotOffsets ?? [])];
    this.stats = { faults: 0, faultPagesFetched: 0, pagesPrefetched: 0, bytesFetched: 0, pagesTotal: pages, pagesPresent: 0, completeMs: null, maxFaultMs: 0, prefetch: opts.prefetch };
    this.done = new Promise((resolve, reject) => { this.resolveDone = resolve; this.rejectDone = reject; });
    this.done.catch(() => undefined);
  }

  static async start(opts: PagerOptions): Promise<NetworkPager> {
    const handler = await MissingPageHandler.attach(opts.qemuPid);
    if (handler.ramSize !== opts.meta.ramSize) {
      handler.close();
      throw new RestoreError('HYDRA_RESTORE_BAD_CONFIG', `VM "${opts.vm}": guest RAM is ${handler.ramSize} bytes but the image holds ${opts.meta.ramSize}`);
    }
    const pager = new NetworkPager(opts, handler);
    void pager.loop().catch((err: Error) => pager.fail(err));
    return pager;
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await this.done.catch(() => undefined);
  }

  private fail(err: Error): void {
    this.log.error({ err: err.message }, 'page fetch failed for good: stopping the VM rather than let it run on missing memory');
    try {
      process.kill(this.opts.qemuPid, 'SIGKILL');
    } catch {
      /* already gone */
    }
    this.handler.close();
    this.rejectDone(err);
  }

  private async loop(): Promise<void> {
    let lastReport = 0;
    while (!this.stopped) {
      const complete = this.stats.pagesPresent === this.stats.pagesTotal;
      // Block for faults only when nothing is left to prefetch.
      const faults = await this.handler.waitFaults(this.opts.prefetch && !complete ? 0 : 100);
      if (faults.length) {
        await this.serveFaults(faults);
      } else if (this.opts.prefetch && !complete) {
        await this.prefetchNext();
      }
      if (this.stats.pagesPresent === this.stats.pagesTotal && this.stats.completeMs === null) {
        this.stats.completeMs = performance.now() - this.t0;
        this.report();
        this.handler.unregister();
        this.resolveDone(this.stats);
        this.handler.close();
        return;
      }
      if (performance.now() - lastReport > 1000) {
        lastReport = performance.now();
        this.report();
      }
    }
    this.handler.close();
    this.resolveDone(this.stats);
  }

  private report(): void {
    const s = this.stats;
    const pct = Math.floor((100 * s.pagesPresent) / s.pagesTotal);
    this.opts.onProgress?.(`memory of ${this.opts.vm}: ${pct}% present (${s.faults} faults served, ${s.pagesPrefetched} pages prefetched)${s.completeMs !== null ? `, complete after ${s.completeMs.toFixed(0)} ms` : ''}`);
  }

  private async serveFaults(faults: number[]): Promise<void> {
    const t = performance.now();
    const windows = new Set<number>();
    for (const off of faults) {
      this.stats.faults++;
      windows.add(Math.floor(off / (FAULT_WINDOW_PAGES * PAGE)) * FAULT_WINDOW_PAGES * PAGE);
    }
    for (const w of windows) {
      const end = Math.min(w + FAULT_WINDOW_PAGES * PAGE, this.opts.meta.ramSize);
      const n = await this.fetchAndFill(w, end);
      this.stats.faultPagesFetched += n;
    }
    this.stats.maxFaultMs = Math.max(this.stats.maxFaultMs, performance.now() - t);
  }

  private async prefetchNext(): Promise<void> {
    while (this.hot.length) {
      const off = this.hot.shift()!;
      if (!this.present[off / PAGE]) {
        this.stats.pagesPrefetched += await this.fetchAndFill(off, Math.min(off + PREFETCH_BYTES, this.opts.meta.ramSize));
        return;
      }
    }
    const pages = this.present.length;
    while (this.cursor < pages && this.present[this.cursor]) this.cursor++;
    if (this.cursor >= pages) return;
    const start = this.cursor * PAGE;
    this.stats.pagesPrefetched += await this.fetchAndFill(start, Math.min(start + PREFETCH_BYTES, this.opts.meta.ramSize));
  }

  /** Fetch the missing pages of [start, end) in one request and copy them in; returns pages filled. */
  private async fetchAndFill(start: number, end: number): Promise<number> {
    const runs: { offset: number; length: number }[] = [];
    for (let p = start / PAGE; p < end / PAGE; p++) {
      if (this.present[p]) continue;
      const last = runs[runs.length - 1];
      if (last && last.offset + last.length === p * PAGE) last.length += PAGE;
      else runs.push({ offset: p * PAGE, length: PAGE });
    }
    if (runs.length === 0) return 0;
    let data: Buffer | undefined;
    let lastErr: unknown;
    for (let attempt = 0; attempt < FETCH_RETRIES && !data; attempt++) {
      try {
        data = await this.opts.client.readPages(runs);
      } catch (err) {
        lastErr = err;
        await new Promise((r) => setTimeout(r, 50 * (attempt + 1)));
      }
    }
    if (!data) throw new RestoreError('HYDRA_RESTORE_PAGE_FETCH', `VM "${this.opts.vm}": cannot fetch pages at ${start}..${end} from the store after ${FETCH_RETRIES} tries: ${(lastErr as Error)?.message}`, { cause: lastErr });
    let pos = 0;
    let filled = 0;
    for (const r of runs) {
      this.handler.fill(r.offset, data.subarray(pos, pos + r.length));
      pos += r.length;
      for (let p = r.offset / PAGE; p < (r.offset + r.length) / PAGE; p++) {
        if (!this.present[p]) {
          this.present[p] = 1;
          filled++;
        }
      }
    }
    this.stats.pagesPresent += filled;
    this.stats.bytesFetched += pos;
    return filled;
  }
}
