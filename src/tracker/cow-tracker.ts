/**
 * Copy-on-write tracking of a QEMU process's guest RAM: sync userfaultfd
 * write-protect faults served by a native handler thread, at a grain of
 * 4 KiB .. 2 MiB (see native/addon/cow.cc).
 *
 *   const t = await CowTracker.attach(pid, { grain: 256 * 1024, stagingBytes });
 *   t.armAll();                       // everything clean from now
 *   // each checkpoint:
 *   t.prearm();                       // VM running: dirty grains protected again, still dirty
 *   const c = t.collect();            // VM paused: dirty grains -> pending
 *   // VM running again: drain the copies
 *   t.startCopy();
 *   for (;;) { const b = await t.nextBatch(8 << 20); send(b.runs, t.staging.subarray(...)); t.release(b); if (b.done) break; }
 *
 * Unlike the async tracker there is no PAGEMAP_SCAN: the dirty set is the
 * handler's own bitmap, so collect() does not walk RAM. The uffd must be one
 * of its own (UFFDIO_API without WP_ASYNC, once per uffd): a fresh one from
 * the shim, or one a previous CoW tracker of this process set up.
 */
import { closeSync, constants as fsConstants, openSync } from 'node:fs';
import { constants as bufferConstants } from 'node:buffer';
import { TrackerError } from '../errors.js';
import { loadNative, type RawAddon, type CowBatch, type CowCollectResult, type CowHandle, type CowStats, type RawCowAddon } from '../native/index.js';
import { findGuestRam, processStartTime, type GuestRamMapping } from './guest-ram.js';
import { populatedRunsOf, type DirtyRun } from './dirty-tracker.js';
import { errnoCode, errnoText, listUffds, openPidfd, processGoneError, UFFD_FEATURE_INITIALIZED } from './uffd.js';

export type { CowBatch, CowCollectResult, CowStats };

export interface CowTrackerOptions {
  /** Bytes protected and copied as one unit; power of two, page size .. 2 MiB. */
  grain: number;
  /** Ring of staging slots the copier fills and the store drains (pre-faulted). */
  stagingBytes: number;
  /**
   * Grains the guest writes before the copier reached them while their ring
   * slot is still in use are copied to spill memory (the writer never waits
   * for the store); past this many bytes the checkpoint is given up.
   */
  maxSpillBytes?: number;
  /** Nice value of the copier thread (0..19): below QEMU's threads. */
  copierNice?: number;
}

export const COW_MIN_GRAIN = 4096;
export const COW_MAX_GRAIN = 2 * 1024 * 1024;

type Native = RawAddon & RawCowAddon;

/** Pick the uffd of `pid` for sync write-protect: one already set up that way (re-attach), else a fresh one. */
function takeSyncUffd(native: Native, pid: number): { fd: number; pidfd: number; fresh: boolean } {
  const C = native.constants;
  const uffds = listUffds(pid);
  if (uffds.length === 0) {
    throw new TrackerError('HYDRA_TRACKER_NO_UFFD', `process ${pid} has no userfaultfd: it was not started with LD_PRELOAD of the HydraVM shim`);
  }
  const isSync = (f: number) => (f & UFFD_FEATURE_INITIALIZED) !== 0 && (f & C.UFFD_FEATURE_WP_UNPOPULATED) !== 0 && (f & C.UFFD_FEATURE_WP_ASYNC) === 0;
  const pick = uffds.find((u) => u.features > 0 && isSync(u.features)) ?? uffds.find((u) => u.features === 0);
  if (!pick) {
    const seen = uffds.map((u) => `fd ${u.targetFd} features 0x${u.features.toString(16)}`).join(', ');
    throw new TrackerError('HYDRA_TRACKER_NO_UFFD', `process ${pid} has no free userfaultfd for copy-on-write tracking: each one accepts its mode once and all are taken (${seen}); start the VM again, or raise HYDRAVM_SHIM_UFFDS`);
  }
  const pidfd = openPidfd(pid, native);
  try {
    return { fd: native.pidfdGetfd(pidfd, pick.targetFd), pidfd, fresh: pick.features === 0 };
  } catch (err) {
    native.close(pidfd);
    if (errnoCode(err) === 'ESRCH') throw processGoneError(pid, `pidfd_getfd of its fd ${pick.targetFd}`, err);
    throw new TrackerError('HYDRA_TRACKER_PROC_FAILED', `pidfd_getfd(${pid}, fd ${pick.targetFd}): ${errnoText(err)}`, { cause: err });
  }
}

export class CowTracker {
  readonly pid: number;
  readonly ramSize: number;
  readonly ramStart: number;
  readonly grain: number;
  readonly mapping: GuestRamMapping;
  /** The ring the copier fills: batches point into it. */
  #staging: Buffer;
  readonly ram: Buffer;
  readonly #native: Native;
  readonly #h: CowHandle;
  readonly #uffd: number;
  readonly #pidfd: number;
  readonly #ramFd: number;
  readonly #startTime: number | undefined;
  #closed = false;

  private constructor(a: { native: Native; pid: number; mapping: GuestRamMapping; grain: number; ram: Buffer; staging: Buffer; h: CowHandle; uffd: number; pidfd: number; ramFd: number; startTime: number | undefined }) {
    this.#native = a.native;
    this.pid = a.pid;
    this.mapping = a.mapping;
    this.ramStart = a.mapping.start;
    this.ramSize = a.mapping.size;
    this.grain = a.grain;
    this.ram = a.ram;
    this.#staging = a.staging;
    this.#h = a.h;
    this.#uffd = a.uffd;
    this.#pidfd = a.pidfd;
    this.#ramFd = a.ramFd;
    this.#startTime = a.startTime;
  }

  /**
   * Take a uffd of `qemuPid` for sync write-protect, register its RAM and start
   * the handler and copier threads. RAM is not protected until armAll().
   * Errors (TrackerError): HYDRA_TRACKER_PROCESS_GONE, HYDRA_TRACKER_NO_UFFD,
   * HYDRA_TRACKER_COW_UNSUPPORTED (private RAM mapping, bad grain),
   * HYDRA_TRACKER_KERNEL_UNSUPPORTED, HYDRA_TRACKER_RANGE_BUSY, HYDRA_TRACKER_ARM_FAILED.
   */
  static async attach(qemuPid: number, opts: CowTrackerOptions): Promise<CowTracker> {
    const native = loadNative() as Native;
    const C = native.constants;
    const pid = qemuPid;
    const { grain } = opts;
    if (!Number.isInteger(grain) || grain < COW_MIN_GRAIN || grain > COW_MAX_GRAIN || (grain & (grain - 1)) !== 0) {
      throw new TrackerError('HYDRA_TRACKER_COW_UNSUPPORTED', `copy-on-write grain ${grain} is not a power of two from 4 KiB to 2 MiB`);
    }
    const startTime = processStartTime(pid);
    if (startTime === undefined) throw processGoneError(pid, `no live process ${pid}`);
    const mapping = findGuestRam(pid);
    if (mapping.kind !== 'shared') {
      throw new TrackerError('HYDRA_TRACKER_COW_UNSUPPORTED', `process ${pid}: guest RAM is a private mapping of ${mapping.path} (a file-mode restore); copy-on-write checkpoints need shared RAM (memfd): protect it without --cow`);
    }
    if (mapping.size % grain !== 0) {
      throw new TrackerError('HYDRA_TRACKER_COW_UNSUPPORTED', `process ${pid}: guest RAM size ${mapping.size} is not a multiple of the copy-on-write grain ${grain}`);
    }
    if (mapping.size > bufferConstants.MAX_LENGTH) {
      throw new TrackerError('HYDRA_TRACKER_RAM_TOO_LARGE', `guest RAM of process ${pid} is ${mapping.size} bytes, more than a Node Buffer can view`);
    }
    const taken = takeSyncUffd(native, pid);
    const undo: Array<() => void> = [() => native.close(taken.fd), () => native.close(taken.pidfd)];
    try {
      if (taken.fresh) {
        const want = C.UFFD_FEATURE_WP_UNPOPULATED | C.UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        let granted: number;
        try {
          granted = native.uffdApi(taken.fd, want).features;
        } catch (err) {
          throw new TrackerError('HYDRA_TRACKER_KERNEL_UNSUPPORTED', `process ${pid}: UFFDIO_API for sync write-protect: ${errnoText(err)}`, { cause: err });
        }
        if ((granted & want) !== want) {
          throw new TrackerError('HYDRA_TRACKER_KERNEL_UNSUPPORTED', `process ${pid}: the kernel does not offer userfaultfd write-protect of unpopulated shmem (granted 0x${granted.toString(16)}, needs Linux 6.7+)`);
        }
      }
      let ramFd: number;
      try {
        ramFd = openSync(mapping.mapFilesPath, fsConstants.O_RDONLY);
      } catch (err) {
        if (processStartTime(pid) !== startTime) throw processGoneError(pid, `opening ${mapping.mapFilesPath}`, err);
        throw new TrackerError('HYDRA_TRACKER_RANGE_CHANGED', `process ${pid}: guest RAM mapping ${mapping.mapFilesPath} vanished while attaching: ${errnoText(err)}`, { cause: err });
      }
      undo.push(() => closeSync(ramFd));
      try {
        native.uffdRegister(taken.fd, mapping.start, mapping.size, C.UFFDIO_REGISTER_MODE_WP);
      } catch (err) {
        const code = errnoCode(err);
        if (code === 'ESRCH' || processStartTime(pid) !== startTime) throw processGoneError(pid, 'UFFDIO_REGISTER', err);
        if (code === 'EBUSY') throw new TrackerError('HYDRA_TRACKER_RANGE_BUSY', `process ${pid}: its guest RAM is registered with another userfaultfd (still tracked by another checkpointer, or a restore still serving missing pages): ${errnoText(err)}`, { cause: err });
        throw new TrackerError('HYDRA_TRACKER_ARM_FAILED', `process ${pid}: UFFDIO_REGISTER (write-protect) of guest RAM ${mapping.path}: ${errnoText(err)}`, { cause: err });
      }
      undo.push(() => native.uffdUnregister(taken.fd, mapping.start, mapping.size));
      let ram: Buffer;
      let staging: Buffer;
      try {
        ram = native.mmapFile(ramFd, mapping.size, mapping.fileOffset, false);
        undo.push(() => native.releaseMapping(ram));
        staging = native.allocStaging(Math.max(grain, Math.floor(opts.stagingBytes / grain) * grain));
      } catch (err) {
        throw new TrackerError('HYDRA_TRACKER_NO_MEMORY', `process ${pid}: mapping guest RAM or allocating ${opts.stagingBytes} bytes of staging: ${errnoText(err)}`, { cause: err });
      }
      const h = native.cowStart(taken.fd, taken.pidfd, mapping.start, mapping.size, grain, ram, staging, opts.maxSpillBytes ?? 256 * 1024 * 1024, opts.copierNice ?? 5);
      return new CowTracker({ native, pid, mapping, grain, ram, staging, h, uffd: taken.fd, pidfd: taken.pidfd, ramFd, startTime });
    } catch (err) {
      for (const f of undo.reverse()) {
        try { f(); } catch { /* best effort: already failing */ }
      }
      throw err;
    }
  }

  #check(what: string): void {
    if (this.#closed) throw new TrackerError('HYDRA_TRACKER_CLOSED', `copy-on-write tracker of process ${this.pid} is closed (${what})`);
  }

  isAlive(): boolean {
    return processStartTime(this.pid) === this.#startTime;
  }

  #fail(step: string, err: unknown): TrackerError {
    if (!this.isAlive() || errnoCode(err) === 'ESRCH') return processGoneError(this.pid, step, err);
    return new TrackerError('HYDRA_TRACKER_COW_FAILED', `process ${this.pid}: ${step}: ${errnoText(err)}`, { cause: err });
  }

  /** Write-protect all RAM; everything counts as clean from now. Returns ms. */
  armAll(): number {
    this.#check('armAll');
    try {
      return this.#native.cowArmAll(this.#h);
    } catch (err) {
      throw this.#fail('write-protecting all guest RAM', err);
    }
  }

  /**
   * Just before the pause, VM running: write-protect the grains written so
   * far again (they stay dirty), so the pause protects only what is written
   * between this and `stop`.
   */
  prearm(): { grains: number; ms: number } {
    this.#check('prearm');
    try {
      return this.#native.cowPrearm(this.#h);
    } catch (err) {
      throw this.#fail('write-protecting the dirty grains before the pause', err);
    }
  }

  /** In the pause: the grains written since the last collect become pending copy (protected again where needed). */
  collect(): CowCollectResult {
    this.#check('collect');
    try {
      return this.#native.cowCollect(this.#h);
    } catch (err) {
      throw this.#fail('turning the dirty grains pending', err);
    }
  }

  /** The ring the copier fills: batches point into it. */
  get staging(): Buffer {
    return this.#staging;
  }

  /**
   * Replace the ring by a bigger one (pre-faulted), between checkpoints. A
   * ring that holds the whole dirty set means a guest write never waits for
   * the store to drain a slot.
   */
  growStaging(bytes: number): void {
    this.#check('growStaging');
    const size = Math.floor(bytes / this.grain) * this.grain;
    if (size <= this.#staging.length) return;
    const next = this.allocStaging(size);
    try {
      this.#native.cowSetStaging(this.#h, next);
    } catch (err) {
      this.#native.releaseMapping(next);
      throw this.#fail('replacing the staging ring', err);
    }
    const old = this.#staging;
    this.#staging = next;
    this.#native.releaseMapping(old);
  }

  /** The VM runs again: start copying the pending grains (kept out of the pause, where QEMU saves its devices). */
  startCopy(): void {
    this.#check('startCopy');
    this.#native.cowStartCopy(this.#h);
  }

  /** The next run of copied grains (at most maxBytes), waiting for the copier up to timeoutMs. */
  async nextBatch(maxBytes: number, timeoutMs = 5000): Promise<CowBatch> {
    this.#check('nextBatch');
    return this.#native.cowWaitBatch(this.#h, maxBytes, timeoutMs);
  }

  /** The batch was handed to the store: its slots may be reused. */
  release(batch: CowBatch): void {
    this.#check('release');
    this.#native.cowRelease(this.#h, batch.grains);
  }

  /** Give up the copy in progress; its grains go into the next checkpoint. */
  fail(reason: string): void {
    if (this.#closed) return;
    this.#native.cowFail(this.#h, reason);
  }

  stats(): CowStats {
    this.#check('stats');
    return this.#native.cowStats(this.#h);
  }

  /** Runs of RAM that hold pages at all (the memfd's data), for a full checkpoint. */
  populatedRuns(): DirtyRun[] {
    this.#check('populatedRuns');
    return populatedRunsOf(this.#native, this.#ramFd, this.mapping.fileOffset, this.ramSize);
  }

  /** Copy runs of RAM contiguously into dst (for the full checkpoint, while the VM runs). */
  copyRuns(runs: DirtyRun[], dst: Buffer): number {
    this.#check('copyRuns');
    const flat = new Float64Array(runs.length * 2);
    runs.forEach((r, i) => { flat[2 * i] = r.offset; flat[2 * i + 1] = r.length; });
    return this.#native.copyRuns(this.ram, flat, dst, 0);
  }

  allocStaging(bytes: number): Buffer {
    try {
      return this.#native.allocStaging(bytes);
    } catch (err) {
      throw new TrackerError('HYDRA_TRACKER_NO_MEMORY', `allocating a ${bytes}-byte staging buffer: ${errnoText(err)}`, { cause: err });
    }
  }

  /**
   * Stop: un-protect and unregister all RAM (every blocked writer goes on),
   * stop the threads, release the views. The uffd stays set up for sync
   * write-protect in QEMU, so a later attach() takes it again. Idempotent.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    const n = this.#native;
    try { n.cowStop(this.#h); } catch { /* process gone: nothing left to wake */ }
    try { n.releaseMapping(this.ram); } catch { /* the finalizer unmaps later */ }
    try { n.releaseMapping(this.#staging); } catch { /* the finalizer unmaps later */ }
    for (const fd of [this.#uffd, this.#pidfd]) {
      try { n.close(fd); } catch { /* already closed */ }
    }
    try { closeSync(this.#ramFd); } catch { /* already closed */ }
  }
}

/**
 * A CoW checkpointer that died (SIGKILL) leaves guest RAM write-protected on a
 * sync uffd that QEMU (the shim) still holds: the guest's next write to a
 * protected grain would wait forever. This takes that uffd and unregisters
 * the RAM range, which wakes every waiting writer. Returns true if it did.
 * alsoAsync: also unregister an async write-protect registration left by a
 * killed basic checkpointer (it blocks nothing, but a new tracker on another
 * uffd would find the range busy). Only when no checkpointer of the VM lives.
 */
export function releaseOrphanedCow(qemuPid: number, opts: { alsoAsync?: boolean } = {}): boolean {
  const native = loadNative() as Native;
  const C = native.constants;
  let uffds;
  try {
    uffds = listUffds(qemuPid);
  } catch {
    return false; // QEMU gone: nothing is blocked
  }
  // Write-protect uffds only (WP_UNPOPULATED): never a restore's missing-page uffd, whose pages would read as zeros.
  const wp = (f: number) => f > 0 && (f & UFFD_FEATURE_INITIALIZED) !== 0 && (f & C.UFFD_FEATURE_WP_UNPOPULATED) !== 0;
  const sync = uffds.filter((u) => wp(u.features) && ((u.features & C.UFFD_FEATURE_WP_ASYNC) === 0 || opts.alsoAsync));
  if (sync.length === 0) return false;
  const mapping = findGuestRam(qemuPid);
  const pidfd = openPidfd(qemuPid, native);
  let done = false;
  try {
    for (const u of sync) {
      const fd = native.pidfdGetfd(pidfd, u.targetFd);
      try {
        native.uffdWriteProtect(fd, mapping.start, mapping.size, false);
        native.uffdUnregister(fd, mapping.start, mapping.size);
        done = true;
      } catch {
        /* not registered on this uffd: nothing to release */
      } finally {
        native.close(fd);
      }
    }
  } finally {
    native.close(pidfd);
  }
  return done;
}
