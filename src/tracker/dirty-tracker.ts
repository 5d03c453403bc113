/**
 * Dirty-page tracking of a QEMU process's guest RAM with userfaultfd
 * write-protect (async mode) and PAGEMAP_SCAN. See docs/design.md,
 * "Protection".
 *
 *   const t = await DirtyTracker.attach(qemuPid);   // armed: everything clean from now
 *   ... full copy of t.ram (or of t.populatedRuns()) ...
 *   // each checkpoint, VM paused:
 *   const runs = t.collect();                        // written since last collect, re-armed
 *   const n = t.copyRuns(runs, staging);             // packed into staging
 *
 * collect() walks only the 2 MiB chunks of the RAM file that hold data
 * (shared mappings): a page never populated was never written, so its cost
 * follows what the guest touched, not the RAM size.
 *
 * Offsets are byte offsets into the RAM block (= into the memfd), page aligned;
 * they are not guest-physical addresses (q35 splits RAM around the PCI hole).
 *
 * `ram` is a read-only MAP_SHARED view of the guest RAM: writing to it kills
 * the process (SIGSEGV). Reading a page the guest never touched allocates it
 * (shmem), so a full copy should skip holes: see populatedRuns().
 *
 * Two kinds of RAM mapping (`mapping.kind`):
 *   'shared'        memfd or share=on file: `ram` views it, copyRuns() memcpys.
 *   'private-file'  a file-mode restore's MAP_PRIVATE mapping of the image
 *                   file: the guest's writes live in copy-on-write pages of
 *                   QEMU's address space only, so there is no `ram` view
 *                   (using it throws HYDRA_TRACKER_NO_RAM_VIEW), copyRuns()
 *                   reads with process_vm_readv, and populatedRuns() is the
 *                   file's data runs UNION the anonymous pages in the mapping.
 * Async write-protect + PAGEMAP_SCAN work on both (Linux 6.7+ lets WP_ASYNC
 * register any memory type; verified on a private file mapping, kernel 6.18).
 */
import { closeSync, constants as fsConstants, openSync, readFileSync } from 'node:fs';
import { TrackerError } from '../errors.js';
import type { RawAddon } from '../native/index.js';
import { processStartTime, type GuestRamMapping, type GuestRamSelector } from './guest-ram.js';
import { errnoCode, errnoText, processGoneError } from './uffd.js';
import { UffdSession } from './uffd-session.js';
import { RamView } from './ram-view.js';

/** Granule of the populated-range bookkeeping: one SEEK_DATA per new chunk, a scan of at most one chunk of holes around data. */
const POPULATED_CHUNK = 2 * 1024 * 1024;

export interface DirtyRun {
  /** Byte offset into guest RAM, page aligned. */
  offset: number;
  /** Bytes, a multiple of the page size. */
  length: number;
}

export interface DirtyTrackerOptions extends GuestRamSelector {}

export interface CollectStats {
  /** PAGEMAP_SCAN calls the last collect() needed. */
  scanCalls: number;
  pages: number;
  runs: number;
  ms: number;
}

export class DirtyTracker {
  readonly pid: number;
  readonly ramSize: number;
  /** Host address of guest RAM in the QEMU process. */
  readonly ramStart: number;
  readonly pageSize: number;
  readonly mapping: GuestRamMapping;
  /** Stats of the last collect(). */
  lastCollect: CollectStats = { scanCalls: 0, pages: 0, runs: 0, ms: 0 };

  readonly #session: UffdSession;
  readonly #native: RawAddon;
  readonly #pagemapFd: number;
  readonly #view: RamView | undefined;
  /**
   * Shared RAM: the runs of the RAM file that may hold data (2 MiB chunks),
   * grown at each scan. A page never populated cannot have been written, so
   * the scans walk only these, not all of RAM.
   */
  #populated: Float64Array | undefined;
  #closed = false;

  private constructor(session: UffdSession, pagemapFd: number, view: RamView | undefined) {
    this.#session = session;
    this.#native = session.native;
    this.pid = session.pid;
    this.mapping = session.mapping;
    this.ramStart = session.mapping.start;
    this.ramSize = session.mapping.size;
    this.pageSize = session.native.pageSize;
    this.#view = view;
    this.#pagemapFd = pagemapFd;
    if (view) this.#populated = new Float64Array(0);
  }

  /**
   * Read-only view of the whole guest RAM (shared mappings only). Never write
   * to it. A private file mapping has none: throws HYDRA_TRACKER_NO_RAM_VIEW
   * (use copyRuns()).
   */
  get ram(): Buffer {
    if (!this.#view) {
      throw new TrackerError('HYDRA_TRACKER_NO_RAM_VIEW', `process ${this.pid}: guest RAM is a private mapping of ${this.mapping.path}; it has no shared view (its written pages exist only in the process): use copyRuns()`);
    }
    const whole = this.#view.whole();
    if (!whole) throw new TrackerError('HYDRA_TRACKER_NO_RAM_VIEW', `process ${this.pid}: guest RAM (${this.ramSize} bytes) is mapped in ${this.#view.chunks.length} parts, more than one Buffer can view: use copyRuns()`);
    return whole;
  }

  /** True when `ram` is available (shared mapping of at most one view chunk). */
  get hasRamView(): boolean {
    return this.#view?.whole() !== undefined;
  }

  /**
   * Find the RAM mapping of `qemuPid`, take its userfaultfd (from the shim),
   * map RAM once, and arm write-protect over all of it. Errors (TrackerError):
   * HYDRA_TRACKER_PROCESS_GONE, HYDRA_TRACKER_NO_RAM, HYDRA_TRACKER_NO_UFFD,
   * HYDRA_TRACKER_KERNEL_UNSUPPORTED, HYDRA_TRACKER_RANGE_BUSY,
   * HYDRA_TRACKER_RANGE_CHANGED, HYDRA_TRACKER_ARM_FAILED; NativeError if the
   * addon is not built.
   */
  static async attach(qemuPid: number, opts: DirtyTrackerOptions = {}): Promise<DirtyTracker> {
    const pid = qemuPid;
    const session = UffdSession.open(pid, 'wp', opts);
    const { native, mapping, startTime } = session;
    const C = native.constants;
    let registered = false;
    try {
      let pagemapFd: number;
      try {
        pagemapFd = openSync(`/proc/${pid}/pagemap`, fsConstants.O_RDONLY);
      } catch (err) {
        throw processGoneError(pid, `opening /proc/${pid}/pagemap`, err);
      }
      session.onClose(() => closeSync(pagemapFd));

      // Arm: API (unless re-attaching to a uffd already set up), REGISTER, WRITEPROTECT.
      const want = C.UFFD_FEATURE_WP_ASYNC | C.UFFD_FEATURE_WP_UNPOPULATED | C.UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
      if (session.features === 0) {
        let granted: number;
        try {
          granted = native.uffdApi(session.uffd, want).features;
        } catch (err) {
          throw DirtyTracker.#unsupported(native, pid, want, err);
        }
        if ((granted & want) !== want) throw DirtyTracker.#unsupported(native, pid, want, undefined, granted);
      }
      let ioctls: number;
      try {
        ioctls = native.uffdRegister(session.uffd, mapping.start, mapping.size, C.UFFDIO_REGISTER_MODE_WP);
      } catch (err) {
        throw DirtyTracker.#armError(pid, mapping, 'UFFDIO_REGISTER (write-protect)', err, startTime);
      }
      if (Math.floor(ioctls / 2 ** C.UFFDIO_WRITEPROTECT_IOCTL_BIT) % 2 !== 1) {
        throw new TrackerError('HYDRA_TRACKER_KERNEL_UNSUPPORTED', `process ${pid}: UFFDIO_WRITEPROTECT is not available on its RAM mapping ${mapping.path} (ioctls 0x${ioctls.toString(16)})`);
      }
      registered = true;
      try {
        native.uffdWriteProtect(session.uffd, mapping.start, mapping.size, true);
      } catch (err) {
        throw DirtyTracker.#armError(pid, mapping, 'UFFDIO_WRITEPROTECT', err, startTime);
      }
      // Still the same mapping after arming (cheap, catches a race with a remap).
      if (!session.mappingUnchanged()) {
        throw new TrackerError('HYDRA_TRACKER_RANGE_CHANGED', `process ${pid}: guest RAM mapping at 0x${mapping.start.toString(16)} changed while attaching`);
      }
      let view: RamView | undefined;
      if (mapping.kind === 'shared') {
        try {
          view = RamView.map(native, session.ramFd, mapping.fileOffset, mapping.size);
        } catch (err) {
          throw new TrackerError('HYDRA_TRACKER_MAP_FAILED', `process ${pid}: mapping its guest RAM (${mapping.size} bytes of ${mapping.path}): ${errnoText(err)}`, { cause: err });
        }
      }
      return new DirtyTracker(session, pagemapFd, view);
    } catch (err) {
      if (registered) {
        try { native.uffdUnregister(session.uffd, mapping.start, mapping.size); } catch { /* attach failed anyway: the process or mapping is gone */ }
      }
      session.close();
      throw err;
    }
  }

  static #unsupported(native: RawAddon, pid: number, want: number, err?: unknown, granted?: number): TrackerError {
    let supported: number | undefined = granted;
    try { supported ??= native.probeUffdFeatures(); } catch { /* keep undefined */ }
    const missing = supported === undefined ? want : want & ~supported;
    const names = Object.entries(native.constants)
      .filter(([k, v]) => k.startsWith('UFFD_FEATURE_') && (missing & v) !== 0)
      .map(([k]) => k)
      .join(', ');
    return new TrackerError(
      'HYDRA_TRACKER_KERNEL_UNSUPPORTED',
      `process ${pid}: the kernel does not offer userfaultfd ${names || `features 0x${want.toString(16)}`} (needs Linux 6.7+ for async write-protect and PAGEMAP_SCAN)${err ? `: ${errnoText(err)}` : ''}`,
      { cause: err },
    );
  }

  static #armError(pid: number, m: GuestRamMapping, step: string, err: unknown, startTime: number | undefined): TrackerError {
    const code = errnoCode(err);
    if (code === 'ESRCH' || processStartTime(pid) !== startTime) return processGoneError(pid, step, err);
    const where = `guest RAM 0x${m.start.toString(16)}+${m.size} (${m.path})`;
    if (code === 'EBUSY') {
      return new TrackerError('HYDRA_TRACKER_RANGE_BUSY', `process ${pid}: ${step} on ${where}: the range is registered with another userfaultfd (a restore still serving missing pages must unregister first): ${errnoText(err)}`, { cause: err });
    }
    if (code === 'ENOMEM') {
      return new TrackerError('HYDRA_TRACKER_RANGE_CHANGED', `process ${pid}: ${step} on ${where}: the range is not (or no longer) mapped in the process that created the userfaultfd (QEMU run with -daemonize without the shim's fork handling?): ${errnoText(err)}`, { cause: err });
    }
    if (code === 'EINVAL') {
      return new TrackerError('HYDRA_TRACKER_KERNEL_UNSUPPORTED', `process ${pid}: ${step} on ${where} refused (memory type not supported for write-protect?): ${errnoText(err)}`, { cause: err });
    }
    return new TrackerError('HYDRA_TRACKER_ARM_FAILED', `process ${pid}: ${step} on ${where}: ${errnoText(err)}`, { cause: err });
  }

  #check(what: string): void {
    if (this.#closed) throw new TrackerError('HYDRA_TRACKER_CLOSED', `dirty tracker of process ${this.pid} is closed (${what})`);
  }

  /** True while the tracked process is alive (same process, not a zombie). */
  isAlive(): boolean {
    return this.#session.isAlive();
  }

  /**
   * Pages written since attach or the previous collect(), as merged runs in
   * ascending order; they are re-protected in the same kernel walk. Call it
   * with the VM paused for a consistent checkpoint.
   */
  collect(): DirtyRun[] {
    const flat = this.collectFlat();
    const out: DirtyRun[] = new Array(flat.length / 2);
    for (let i = 0, j = 0; i < flat.length; i += 2, j++) out[j] = { offset: flat[i]!, length: flat[i + 1]! };
    return out;
  }

  /** collect() as [offset, length] pairs (what the native layer returns). */
  collectFlat(vecLen?: number): Float64Array {
    this.#check('collect');
    const t0 = performance.now();
    let res;
    try {
      const ranges = this.#scanRanges();
      res = ranges
        ? this.#native.scanWrittenIn(this.#pagemapFd, this.ramStart, ranges, vecLen)
        : this.#native.scanWritten(this.#pagemapFd, this.ramStart, this.ramStart + this.ramSize, vecLen);
    } catch (err) {
      throw this.#runtimeError('PAGEMAP_SCAN', err);
    }
    if (!this.#session.mappingUnchanged()) {
      // An unmapped range scans as empty without error: one stat makes sure the result is real.
      throw this.#runtimeError('PAGEMAP_SCAN', undefined);
    }
    this.lastCollect = { scanCalls: res.calls, pages: res.pages, runs: res.runs.length / 2, ms: performance.now() - t0 };
    return res.runs;
  }

  /**
   * Shared RAM: the chunks of the RAM file that may hold data, grown by what
   * was populated since the last call (SEEK_DATA in the gaps only). A written
   * page is a populated one (the write allocates it in the file before it
   * lands), so the pages outside were not written. Private mappings: undefined
   * (their writes live outside the file), scan everything.
   */
  #scanRanges(): Float64Array | undefined {
    if (!this.#populated) return undefined;
    this.#populated = this.#native.extendDataRuns(this.#session.ramFd, this.mapping.fileOffset, this.ramSize, this.#populated, POPULATED_CHUNK);
    return this.#populated;
  }

  /** Bytes of RAM the scans walk (all of RAM for a private mapping). */
  get scannedBytes(): number {
    if (!this.#populated) return this.ramSize;
    let n = 0;
    for (let i = 1; i < this.#populated.length; i += 2) n += this.#populated[i]!;
    return n;
  }

  /** Bring the populated chunks up to date while the VM runs, so the pause finds few new ones. */
  refreshPopulated(): void {
    this.#check('refreshPopulated');
    try {
      this.#scanRanges();
    } catch (err) {
      throw this.#runtimeError('lseek(SEEK_DATA) of the RAM file', err);
    }
  }

  #runtimeError(step: string, err: unknown): TrackerError {
    if (!this.isAlive() || errnoCode(err) === 'ESRCH') return processGoneError(this.pid, step, err);
    const code = errnoCode(err);
    if (err === undefined || code === 'EPERM' || code === 'ENOENT' || !this.#session.mappingUnchanged()) {
      return new TrackerError(
        'HYDRA_TRACKER_RANGE_CHANGED',
        `process ${this.pid}: ${step}: guest RAM mapping 0x${this.ramStart.toString(16)}+${this.ramSize} is no longer the write-protected one${err ? `: ${errnoText(err)}` : ''}`,
        { cause: err },
      );
    }
    if (code === 'ENOTTY' || code === 'EINVAL') {
      return new TrackerError('HYDRA_TRACKER_KERNEL_UNSUPPORTED', `process ${this.pid}: ${step}: ${errnoText(err)} (PAGEMAP_SCAN needs Linux 6.7+)`, { cause: err });
    }
    return new TrackerError('HYDRA_TRACKER_SCAN_FAILED', `process ${this.pid}: ${step}: ${errnoText(err)}`, { cause: err });
  }

  /**
   * Bytes written since the last collect(), without re-protecting anything
   * (a page walk, like collect(): call it while the VM runs, to size the
   * next pause's copy).
   */
  peekWrittenBytes(): number {
    this.#check('peekWrittenBytes');
    const C = this.#native.constants;
    try {
      const ranges = this.#scanRanges();
      const res = ranges
        ? this.#native.countWrittenIn(this.#pagemapFd, this.ramStart, ranges)
        : this.#native.scanPages(this.#pagemapFd, this.ramStart, this.ramStart + this.ramSize, { categoryMask: C.PAGE_IS_WRITTEN, returnMask: C.PAGE_IS_WRITTEN });
      return res.pages * this.pageSize;
    } catch (err) {
      throw this.#runtimeError('PAGEMAP_SCAN (peek)', err);
    }
  }

  /**
   * Copy the runs of guest RAM contiguously into dst (from dstOffset); returns
   * bytes copied. maxThreads bounds the copy threads (shared mappings).
   */
  copyRuns(runs: DirtyRun[] | Float64Array, dst: Buffer, dstOffset = 0, maxThreads?: number): number {
    this.#check('copyRuns');
    let flat: Float64Array;
    if (runs instanceof Float64Array) flat = runs;
    else {
      flat = new Float64Array(runs.length * 2);
      for (let i = 0; i < runs.length; i++) {
        flat[2 * i] = runs[i]!.offset;
        flat[2 * i + 1] = runs[i]!.length;
      }
    }
    if (this.#view) {
      try {
        return this.#view.copyRuns(flat, dst, dstOffset, maxThreads);
      } catch (err) {
        throw new TrackerError('HYDRA_TRACKER_COPY_FAILED', `process ${this.pid}: copying dirty runs: ${errnoText(err)}`, { cause: err });
      }
    }
    try {
      return this.#native.processReadRuns(this.pid, this.ramStart, flat, dst, dstOffset, this.ramSize);
    } catch (err) {
      if (errnoCode(err) === 'ESRCH' || !this.isAlive()) throw processGoneError(this.pid, 'process_vm_readv of guest RAM', err);
      if (!(err instanceof TypeError) && !this.#session.mappingUnchanged()) throw this.#runtimeError('process_vm_readv of guest RAM', err);
      throw new TrackerError('HYDRA_TRACKER_COPY_FAILED', `process ${this.pid}: reading dirty runs of its private guest RAM (${this.mapping.path}): ${errnoText(err)}`, { cause: err });
    }
  }

  /** A pre-faulted (MAP_POPULATE) buffer for staging checkpoint pages; allocate once, reuse. */
  allocStaging(bytes: number): Buffer {
    try {
      return this.#native.allocStaging(bytes);
    } catch (err) {
      throw new TrackerError('HYDRA_TRACKER_NO_MEMORY', `allocating a ${bytes}-byte staging buffer: ${errnoText(err)}`, { cause: err });
    }
  }

  /**
   * Give a staging buffer's memory back now instead of at the next GC: a
   * replaced gigabyte-sized buffer would otherwise stay resident for as long
   * as the heap stays small. The Buffer must not be used afterwards.
   */
  releaseStaging(buf: Buffer): void {
    try {
      this.#native.releaseMapping(buf);
    } catch {
      /* not an addon mapping or already gone: the finalizer unmaps it */
    }
  }

  /**
   * Runs of guest RAM that hold pages at all (SEEK_DATA/SEEK_HOLE on the RAM
   * file). Holes read as zeros; copying only these keeps a full checkpoint
   * from allocating the guest's untouched memory.
   *
   * Private file mapping: the file's data runs UNION the pages of the mapping
   * that are anonymous (copy-on-write copies, or pages the guest wrote in a
   * hole of the file): PAGEMAP_SCAN PAGE_IS_PRESENT and not PAGE_IS_FILE. If
   * swap is active, swapped-out anonymous pages cannot be told from the
   * uffd-wp markers of never-touched pages (both are PAGE_IS_SWAPPED, not
   * PAGE_IS_FILE), so all of them are included (correct, copies more).
   */
  populatedRuns(): DirtyRun[] {
    this.#check('populatedRuns');
    const fileRuns = populatedRunsOf(this.#native, this.#session.ramFd, this.mapping.fileOffset, this.ramSize);
    if (this.#view) return fileRuns;
    const C = this.#native.constants;
    const anyof = C.PAGE_IS_PRESENT | (swapActive() ? C.PAGE_IS_SWAPPED : 0);
    let res;
    try {
      res = this.#native.scanPages(this.#pagemapFd, this.ramStart, this.ramStart + this.ramSize, {
        categoryInverted: C.PAGE_IS_FILE,
        categoryMask: C.PAGE_IS_FILE,
        categoryAnyofMask: anyof,
        returnMask: anyof,
      });
    } catch (err) {
      throw this.#runtimeError('PAGEMAP_SCAN (present pages)', err);
    }
    if (!this.#session.mappingUnchanged()) throw this.#runtimeError('PAGEMAP_SCAN (present pages)', undefined);
    const anon: DirtyRun[] = [];
    for (let i = 0; i < res.runs.length; i += 2) anon.push({ offset: res.runs[i]!, length: res.runs[i + 1]! });
    return unionRuns(fileRuns, anon);
  }

  /** Cheap check that the mapping is still the one armed. */
  mappingUnchanged(): boolean {
    return this.#session.mappingUnchanged();
  }

  /**
   * Stop tracking: unregister write-protect (if the process lives), release
   * the RAM view (reads of `ram` then give zeros) and close the fds. The
   * process's uffd stays set up for async write-protect, so a later attach()
   * re-arms it. Idempotent.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    const n = this.#native;
    if (this.isAlive()) {
      try { n.uffdUnregister(this.#session.uffd, this.ramStart, this.ramSize); } catch { /* mapping gone: nothing to undo */ }
    }
    this.#view?.release();
    this.#session.close();
  }
}

/** Populated [offset, length) runs of a file region via SEEK_DATA / SEEK_HOLE, relative to base. */
export function populatedRunsOf(native: RawAddon, fd: number, base: number, size: number): DirtyRun[] {
  const out: DirtyRun[] = [];
  const end = base + size;
  let pos = base;
  while (pos < end) {
    const data = native.lseek(fd, pos, 'data');
    if (data < 0 || data >= end) break;
    let hole = native.lseek(fd, data, 'hole');
    if (hole < 0 || hole > end) hole = end;
    out.push({ offset: data - base, length: hole - data });
    pos = hole;
  }
  return out;
}

/** Union of two ascending run lists, merged where they touch or overlap. */
export function unionRuns(a: readonly DirtyRun[], b: readonly DirtyRun[]): DirtyRun[] {
  const all = [...a, ...b].sort((x, y) => x.offset - y.offset);
  const out: DirtyRun[] = [];
  for (const r of all) {
    if (r.length <= 0) continue;
    const last = out[out.length - 1];
    if (last && r.offset <= last.offset + last.length) {
      last.length = Math.max(last.length, r.offset + r.length - last.offset);
    } else out.push({ offset: r.offset, length: r.length });
  }
  return out;
}

/** True if /proc/swaps lists any active swap area. */
function swapActive(): boolean {
  try {
    return readFileSync('/proc/swaps', 'utf8').trim().split('\n').length > 1;
  } catch {
    return true; // unknown: be conservative
  }
}
