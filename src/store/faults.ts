/**
 * Crash injection for the crash-consistency test. `HYDRAVM_STORE_CRASH_AT=<point>:<n>`
 * (several separated by commas) makes the store process SIGKILL itself at the n-th
 * time it reaches <point>. Write points first write half of the buffer, so the
 * crash leaves a torn write behind, then die.
 *
 * Delay injection for the fencing race tests (tests only, never in production):
 * `HYDRAVM_STORE_DELAY=<point>:<ms>,...` makes every pass through <point> wait
 * <ms> milliseconds, to widen a window another process must race into.
 */
import { log } from '../util/log.js';
import { StoreError } from '../errors.js';

export const CRASH_POINTS = [
  'journal-append', // appending a record to the journal (torn: half the record written)
  'journal-fsync', // before the journal's fdatasync at COMMIT
  'apply-write', // pwrite of a page run into memory.img during apply (torn)
  'apply-fsync', // before memory.img's fdatasync
  'devstate-write', // writing devstate-<epoch>.bin (torn)
  'devstate-fsync', // before devstate-<epoch>.bin's fsync
  'meta-write', // writing meta.json.tmp (torn)
  'meta-rename', // before rename(meta.json.tmp, meta.json)
  'meta-dirsync', // after the rename, before the directory fsync
  'journal-reset', // before the journal is truncated after the commit
  'full-write', // pwrite of a page run of a direct full checkpoint (torn)
  'full-fsync', // before the fdatasync of a direct full checkpoint's image
] as const;
export type CrashPoint = (typeof CRASH_POINTS)[number];

export const DELAY_POINTS = [
  'commit-before-end', // holding the generation lock, fence checked, before the journal END
  'commit-before-apply', // END durable and acknowledged, before the first write into the image
  'apply-before-meta', // image and device state written, before meta.json
  'register-after-fence', // a registration's fence is written, before the registering peer is answered
] as const;
export type DelayPoint = (typeof DELAY_POINTS)[number];

export class FaultInjector {
  private readonly targets = new Map<string, number>();
  private readonly counts = new Map<string, number>();

  private readonly delays = new Map<string, number>();

  constructor(spec?: string, delaySpec?: string) {
    for (const part of (delaySpec ?? '').split(',').map((x) => x.trim()).filter(Boolean)) {
      const m = /^([a-z-]+):(\d+)$/.exec(part);
      if (!m || !(DELAY_POINTS as readonly string[]).includes(m[1]!)) {
        throw new StoreError('HYDRA_STORE_BAD_CRASH_POINT', `bad HYDRAVM_STORE_DELAY entry "${part}": expected <point>:<ms> with point one of ${DELAY_POINTS.join(', ')}`);
      }
      this.delays.set(m[1]!, Number(m[2]));
    }
    for (const part of (spec ?? '').split(',').map((s) => s.trim()).filter(Boolean)) {
      const m = /^([a-z-]+):(\d+)$/.exec(part);
      if (!m || !(CRASH_POINTS as readonly string[]).includes(m[1]!)) {
        throw new StoreError('HYDRA_STORE_BAD_CRASH_POINT', `bad HYDRAVM_STORE_CRASH_AT entry "${part}": expected <point>:<n> with point one of ${CRASH_POINTS.join(', ')}`);
      }
      this.targets.set(m[1]!, Number(m[2]));
    }
  }

  get enabled(): boolean {
    return this.targets.size > 0;
  }

  /** Count one occurrence of `point`; true when the process must crash now. */
  private due(point: CrashPoint): boolean {
    if (this.targets.size === 0) return false;
    const n = (this.counts.get(point) ?? 0) + 1;
    this.counts.set(point, n);
    return this.targets.get(point) === n;
  }

  /** Wait here when a delay is configured for `point` (tests only). */
  async delay(point: DelayPoint): Promise<void> {
    const ms = this.delays.get(point);
    if (!ms) return;
    log.warn({ point, ms }, 'fault injection: delaying');
    await new Promise((r) => setTimeout(r, ms));
  }

  /** Crash here if this is the configured occurrence of `point`. */
  hit(point: CrashPoint): void {
    if (this.due(point)) die(point);
  }

  /**
   * For write points: if due, run `torn` (which writes part of the data), then crash.
   */
  async hitWrite(point: CrashPoint, torn: () => Promise<void>): Promise<void> {
    if (!this.due(point)) return;
    try {
      await torn();
    } finally {
      die(point);
    }
  }
}

function die(point: string): never {
  log.warn({ point }, 'fault injection: crashing the store process (SIGKILL)');
  process.kill(process.pid, 'SIGKILL');
  // SIGKILL is not delivered synchronously in every case; never continue past a crash point.
  for (;;) {
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 1000);
  }
}

export const noFaults = new FaultInjector();
