// The missing-page side of a network-mode slim restore: fills a QEMU process's guest RAM on demand through userfaultfd.
/**
 * QEMU runs with shared memfd RAM and the shim; before
 * `migrate-incoming`, this handler takes one of QEMU's userfaultfds, registers
 * the RAM range in MISSING mode, and every first touch of a page (guest or
 * QEMU itself) blocks until fill() supplies it with UFFDIO_COPY.
 *
 *   const h = await MissingPageHandler.attach(qemuPid);
 *   for (;;) {
 *     const offsets = await h.waitFaults(50);          // page-aligned RAM offsets
 *     for (const off of offsets) h.fill(runStart, await fetchRun(runStart, len));
 *     // idle: stream the rest, skipping what is there: h.nextMissing(pos)
 *   }
 *   h.unregister(); h.close();                         // when all memory is in
 *
 * Offsets are byte offsets into the RAM block, as the DirtyTracker's.
 *
 * Never read the guest's RAM through a mapping of this process while the
 * restore runs: a read fault on a shmem hole allocates a zero page, which the
 * guest would then see instead of its memory (UFFDIO_COPY reports EEXIST).
 * Hence no `ram` view here; isPopulated()/nextMissing() use SEEK_DATA.
 *
 * Errors are TrackerErrors with the tracker's codes (HYDRA_TRACKER_*), since
 * they come from the same native layer.
 */
import { TrackerError } from '../errors.js';
import type { RawAddon } from '../native/index.js';
import type { GuestRamMapping, GuestRamSelector } from './guest-ram.js';
import { populatedRunsOf, type DirtyRun } from './dirty-tracker.js';
import { errnoCode, errnoText, processGoneError } from './uffd.js';
import { UffdSession } from './uffd-session.js';

export interface MissingPageHandlerOptions extends GuestRamSelector {}

export interface FillResult {
  /** True when every page of the run was placed by this call. */
  copied: boolean;
  /** Bytes this call placed. */
  bytes: number;
  /** Bytes that were already present (skipped; their waiters were woken). */
  existed: number;
}

export class MissingPageHandler {
  readonly pid: number;
  readonly ramSize: number;
  readonly ramStart: number;
  readonly pageSize: number;
  readonly mapping: GuestRamMapping;
  /** Faults seen and pages placed, for metrics. */
  readonly stats = { faults: 0, fills: 0, bytesFilled: 0, bytesExisted: 0 };

  readonly #session: UffdSession;
  readonly #native: RawAddon;
  readonly #uffd: number;
  readonly #cancelFd: number;
  #waiting: Promise<unknown> | undefined;
  #closed = false;

  private constructor(session: UffdSession, cancelFd: number) {
    this.#session = session;
    this.#native = session.native;
    this.pid = session.pid;
    this.mapping = session.mapping;
    this.ramStart = session.mapping.start;
    this.ramSize = session.mapping.size;
    this.pageSize = session.native.pageSize;
    this.#uffd = session.uffd;
    this.#cancelFd = cancelFd;
  }

  /**
   * Take a uffd of `qemuPid` (a fresh one, or the one a previous handler of
   * this VM left registered) and register its guest RAM in MISSING mode.
   */
  static async attach(qemuPid: number, opts: MissingPageHandlerOptions = {}): Promise<MissingPageHandler> {
    const pid = qemuPid;
    const session = UffdSession.open(pid, 'missing', opts);
    const { native, mapping } = session;
    const C = native.constants;
    try {
      if (session.features === 0) {
        try {
          native.uffdApi(session.uffd, 0);
        } catch (err) {
          throw new TrackerError('HYDRA_TRACKER_ARM_FAILED', `process ${pid}: UFFDIO_API on its userfaultfd (fd ${session.targetFd}): ${errnoText(err)}`, { cause: err });
        }
      }
      native.setNonblock(session.uffd);
      let ioctls: number;
      try {
        ioctls = native.uffdRegister(session.uffd, mapping.start, mapping.size, C.UFFDIO_REGISTER_MODE_MISSING);
      } catch (err) {
        const code = errnoCode(err);
        if (code === 'ESRCH' || !session.isAlive()) throw processGoneError(pid, 'UFFDIO_REGISTER (missing)', err);
        const where = `guest RAM 0x${mapping.start.toString(16)}+${mapping.size} (${mapping.path})`;
        if (code === 'EBUSY') throw new TrackerError('HYDRA_TRACKER_RANGE_BUSY', `process ${pid}: UFFDIO_REGISTER (missing) on ${where}: registered with another userfaultfd (a tracker attached?): ${errnoText(err)}`, { cause: err });
        if (code === 'ENOMEM') throw new TrackerError('HYDRA_TRACKER_RANGE_CHANGED', `process ${pid}: UFFDIO_REGISTER (missing) on ${where}: not mapped in the process that created the userfaultfd: ${errnoText(err)}`, { cause: err });
        throw new TrackerError('HYDRA_TRACKER_ARM_FAILED', `process ${pid}: UFFDIO_REGISTER (missing) on ${where}: ${errnoText(err)}`, { cause: err });
      }
      if (Math.floor(ioctls / 2 ** C.UFFDIO_COPY_IOCTL_BIT) % 2 !== 1) {
        throw new TrackerError('HYDRA_TRACKER_KERNEL_UNSUPPORTED', `process ${pid}: UFFDIO_COPY is not available on its RAM mapping ${mapping.path} (ioctls 0x${ioctls.toString(16)})`);
      }
      const cancelFd = native.eventfdCreate();
      session.onClose(() => native.close(cancelFd));
      return new MissingPageHandler(session, cancelFd);
    } catch (err) {
      session.close();
      throw err;
    }
  }

  #check(what: string): void {
    if (this.#closed) throw new TrackerError('HYDRA_TRACKER_CLOSED', `missing-page handler of process ${this.pid} is closed (${what})`);
  }

  isAlive(): boolean {
    return this.#session.isAlive();
  }

  /**
   * Wait up to timeoutMs for page faults; resolves with the distinct faulting
   * page offsets (arrival order), [] on timeout or close(). Rejects with
   * HYDRA_TRACKER_PROCESS_GONE when QEMU exits. One wait at a time.
   */
  async waitFaults(timeoutMs: number): Promise<number[]> {
    this.#check('waitFaults');
    if (this.#waiting) throw new TrackerError('HYDRA_TRACKER_BUSY', `missing-page handler of process ${this.pid}: waitFaults() already in progress`);
    const p = this.#native.waitFaults(this.#uffd, this.#cancelFd, this.#session.pidfd, timeoutMs);
    this.#waiting = p;
    let r;
    try {
      r = await p;
    } catch (err) {
      throw new TrackerError('HYDRA_TRACKER_FAULT_WAIT_FAILED', `process ${this.pid}: waiting for page faults: ${errnoText(err)}`, { cause: err });
    } finally {
      this.#waiting = undefined;
      if (this.#closed) this.#closeFds();
    }
    const seen = new Set<number>();
    const out: number[] = [];
    for (const a of r.addresses) {
      const off = a - this.ramStart;
      if (off < 0 || off >= this.ramSize || seen.has(off)) continue;
      seen.add(off);
      out.push(off);
    }
    this.stats.faults += out.length;
    if (out.length === 0 && r.exited) throw processGoneError(this.pid, 'it exited while its memory was being restored');
    return out;
  }

  /**
   * Place data (a whole number of pages) at the page-aligned RAM offset with
   * UFFDIO_COPY and wake whoever waits on it. Pages already present are
   * skipped (their waiters woken too).
   */
  fill(offset: number, data: Buffer, dataOffset = 0, length = data.length - dataOffset): FillResult {
    this.#check('fill');
    if (offset < 0 || offset % this.pageSize !== 0 || length <= 0 || length % this.pageSize !== 0 || offset + length > this.ramSize) {
      throw new TrackerError('HYDRA_TRACKER_BAD_RANGE', `process ${this.pid}: fill(${offset}, ${length} bytes) is not a whole-page range inside guest RAM (${this.ramSize} bytes)`);
    }
    let r;
    try {
      r = this.#native.uffdCopy(this.#uffd, this.ramStart + offset, data, dataOffset, length);
    } catch (err) {
      throw this.#runtimeError(`UFFDIO_COPY at offset ${offset} (+${length})`, err);
    }
    this.stats.fills++;
    this.stats.bytesFilled += r.copied;
    this.stats.bytesExisted += r.existed;
    return { copied: r.copied === length, bytes: r.copied, existed: r.existed };
  }

  /** Wake threads waiting on a range (e.g. after placing pages by other means). */
  wake(offset: number, length: number): void {
    this.#check('wake');
    try {
      this.#native.uffdWake(this.#uffd, this.ramStart + offset, length);
    } catch (err) {
      throw this.#runtimeError(`UFFDIO_WAKE at offset ${offset} (+${length})`, err);
    }
  }

  /** Whether the page at offset holds data (filled, or written by QEMU before attach). */
  isPopulated(offset: number): boolean {
    this.#check('isPopulated');
    const pos = this.mapping.fileOffset + offset;
    const d = this.#native.lseek(this.#session.ramFd, pos, 'data');
    return d >= 0 && d < pos + this.pageSize;
  }

  /** First missing (unpopulated) offset at or after `from`, or -1 if all of the rest is in. */
  nextMissing(from = 0): number {
    this.#check('nextMissing');
    const base = this.mapping.fileOffset;
    const hole = this.#native.lseek(this.#session.ramFd, base + from, 'hole');
    if (hole < 0 || hole >= base + this.ramSize) return -1;
    return hole - base;
  }

  /** Populated runs of guest RAM (what is already in). */
  populatedRuns(): DirtyRun[] {
    this.#check('populatedRuns');
    return populatedRunsOf(this.#native, this.#session.ramFd, this.mapping.fileOffset, this.ramSize);
  }

  /**
   * Stop handling missing pages: after this, a touch of an unfilled page gets
   * zeros. Call only when all memory is in (nextMissing() === -1) or the VM is
   * being discarded. Frees the range for write-protect tracking.
   */
  unregister(): void {
    this.#check('unregister');
    try {
      this.#native.uffdUnregister(this.#uffd, this.ramStart, this.ramSize);
    } catch (err) {
      throw this.#runtimeError('UFFDIO_UNREGISTER', err);
    }
  }

  #runtimeError(step: string, err: unknown): TrackerError {
    const code = errnoCode(err);
    if (code === 'ESRCH' || !this.isAlive()) return processGoneError(this.pid, step, err);
    if (code === 'ENOENT' || !this.#session.mappingUnchanged()) {
      return new TrackerError('HYDRA_TRACKER_RANGE_CHANGED', `process ${this.pid}: ${step}: guest RAM mapping 0x${this.ramStart.toString(16)}+${this.ramSize} is no longer the registered one: ${errnoText(err)}`, { cause: err });
    }
    return new TrackerError('HYDRA_TRACKER_FILL_FAILED', `process ${this.pid}: ${step}: ${errnoText(err)}`, { cause: err });
  }

  /**
   * Release this handler. The range stays registered (QEMU keeps the uffd):
   * faulting threads keep waiting for a handler rather than reading zeros, and
   * a new attach() takes over. A pending waitFaults() resolves with [].
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try { this.#native.eventfdSignal(this.#cancelFd); } catch { /* ignore */ }
    if (!this.#waiting) this.#closeFds();
  }

  #closeFds(): void {
    this.#session.close();
  }
}
