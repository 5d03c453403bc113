// File mode's background prefetch: the restored image file is brought into the page cache, hottest regions first, while the guest runs.
import fs from 'node:fs';
import { fileDataRunsOf, warmFileRuns, type DirtyRun } from '../tracker/index.js';
import { vmLog } from '../util/log.js';
import { sleep } from '../util/sleep.js';
import { GuestDelay } from './guest-delay.js';

/** Heat-record regions are this large (the store's unit). */
const REGION_BYTES = 2 * 1024 * 1024;
/** One threadpool job: large enough for readahead to stream, small enough to stop or yield quickly. */
const BATCH_BYTES = 32 * 1024 * 1024;

export interface ImageWarmStats {
  /** Bytes of the image that hold data (holes read as zeros without I/O). */
  bytesTotal: number;
  bytesWarmed: number;
  /** From start() until every populated byte was cached (null while running, or when stopped). */
  completeMs: number | null;
  /** Time spent waiting because the guest waited for a CPU (the guard). */
  throttledMs: number;
}

export interface ImageWarmerOptions {
  vm: string;
  /** The image file the VM's RAM is a private mapping of. */
  file: string;
  /** The restored QEMU: its vCPUs' run-queue wait paces the warming. */
  qemuPid: number;
  /** Byte offsets of the regions the VM wrote most before it failed (the heat record): first. */
  hotOffsets?: number[];
  /** Pause between batches while the vCPUs wait for a CPU more than this share of the time (default 0.05). */
  maxGuestDelay?: number;
  onProgress?: (msg: string) => void;
}

/**
 * A file-mode restore maps the image privately, so the kernel fills guest
 * RAM from the file on each first touch: a disk read each time the file is
 * not cached on this host (shared storage seen from another host). The
 * warmer reads the image into the page cache in the background, the heat
 * record's regions first, so those touches become minor faults. The reads
 * run in the threadpool in 32 MiB batches; between batches it yields while
 * the guest's vCPUs wait for a CPU, so warming never slows the guest much.
 * It holds no memory of its own: what it reads is reclaimable cache.
 */
export class ImageWarmer {
  readonly stats: ImageWarmStats;
  readonly done: Promise<ImageWarmStats>;
  private stopped = false;

  private constructor(private readonly opts: ImageWarmerOptions, private readonly fd: number, private readonly order: DirtyRun[]) {
    this.stats = { bytesTotal: order.reduce((s, r) => s + r.length, 0), bytesWarmed: 0, completeMs: null, throttledMs: 0 };
    this.done = this.run();
  }

  /** Opens the image and starts warming it; never throws (a warmer that cannot start only logs why). */
  static start(opts: ImageWarmerOptions): ImageWarmer | undefined {
    let fd = -1;
    try {
      fd = fs.openSync(opts.file, 'r');
      const size = fs.fstatSync(fd).size;
      return new ImageWarmer(opts, fd, warmOrder(fileDataRunsOf(fd, size), opts.hotOffsets ?? [], size));
    } catch (err) {
      if (fd >= 0) fs.closeSync(fd);
      vmLog(opts.vm).warn({ file: opts.file, err: (err as Error).message }, 'image warming not started: the guest pages its memory in on first touch');
      return undefined;
    }
  }

  /** Stop after the batch in flight; `done` then resolves with completeMs null. */
  stop(): void {
    this.stopped = true;
  }

  private async run(): Promise<ImageWarmStats> {
    const t0 = performance.now();
    const delay = new GuestDelay(this.opts.qemuPid);
    const maxDelay = this.opts.maxGuestDelay ?? 0.05;
    const log = vmLog(this.opts.vm);
    let lastReport = 0;
    try {
      delay.sample();
      for (const batch of batches(this.order, BATCH_BYTES)) {
        if (this.stopped) return this.stats;
        const d = delay.sample();
        if (d !== null && d > maxDelay) {
          const tw = performance.now();
          await sleep(100);
          this.stats.throttledMs += performance.now() - tw;
          delay.sample();
        }
        this.stats.bytesWarmed += await warmFileRuns(this.fd, batch);
        if (this.opts.onProgress && performance.now() - lastReport > 1000) {
          lastReport = performance.now();
          this.opts.onProgress(`VM ${this.opts.vm}: image cached ${mb(this.stats.bytesWarmed)} of ${mb(this.stats.bytesTotal)} MB`);
        }
      }
      this.stats.completeMs = performance.now() - t0;
      log.info({ bytes: this.stats.bytesWarmed, ms: Math.round(this.stats.completeMs), throttledMs: Math.round(this.stats.throttledMs) }, 'image file cached: guest memory faults are minor from here');
      return this.stats;
    } catch (err) {
      // Warming is only an optimisation: the guest still reads the file on its own faults.
      log.warn({ err: (err as Error).message, bytesWarmed: this.stats.bytesWarmed }, 'image warming stopped');
      return this.stats;
    } finally {
      fs.closeSync(this.fd);
    }
  }
}

const mb = (b: number) => (b / 2 ** 20).toFixed(0);

/** The hot regions first, then the populated runs of the file outside them, in address order; each byte once. */
export function warmOrder(populated: DirtyRun[], hotOffsets: number[], size: number): DirtyRun[] {
  const hot = [...new Set(hotOffsets.map((o) => Math.floor(o / REGION_BYTES) * REGION_BYTES))].filter((o) => o >= 0 && o < size);
  const first: DirtyRun[] = [];
  const taken = new Set<number>();
  // A hole inside a hot region reads as zeros without I/O: no need to clip it to the populated runs.
  for (const h of hot) {
    first.push({ offset: h, length: Math.min(size, h + REGION_BYTES) - h });
    taken.add(h);
  }
  const rest: DirtyRun[] = [];
  for (const r of populated) {
    // Split at region boundaries so the hot regions already taken are skipped.
    for (let o = r.offset; o < r.offset + r.length;) {
      const region = Math.floor(o / REGION_BYTES) * REGION_BYTES;
      const end = Math.min(r.offset + r.length, region + REGION_BYTES);
      if (!taken.has(region)) {
        const last = rest.at(-1);
        if (last && last.offset + last.length === o) last.length += end - o;
        else rest.push({ offset: o, length: end - o });
      }
      o = end;
    }
  }
  return [...first, ...rest];
}

/** Runs cut into batches of about `bytes` each (a run may be split). */
function* batches(runs: DirtyRun[], bytes: number): Generator<DirtyRun[]> {
  let cur: DirtyRun[] = [];
  let n = 0;
  for (const r0 of runs) {
    let r = { ...r0 };
    while (r.length > 0) {
      const take = Math.min(r.length, bytes - n);
      cur.push({ offset: r.offset, length: take });
      n += take;
      r = { offset: r.offset + take, length: r.length - take };
      if (n >= bytes) {
        yield cur;
        cur = [];
        n = 0;
      }
    }
  }
  if (cur.length) yield cur;
}
