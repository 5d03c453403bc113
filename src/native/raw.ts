/**
 * The raw interface of native/build/Release/hydra_native.node (sources in
 * native/addon). One function per kernel operation, no policy. Numbers that are
 * addresses or lengths are exact JS numbers (user addresses are < 2^48).
 *
 * Every function throws a `RawNativeError` (a plain Error with errno / code /
 * syscall) when the kernel refuses; src/native/index.ts and the tracker turn
 * those into HydraVM errors.
 */
export interface RawNativeError extends Error {
  errno: number;
  /** errno name, e.g. "ESRCH". */
  code: string;
  /** What was called, e.g. "ioctl(PAGEMAP_SCAN)". */
  syscall: string;
}

export interface UffdApiResult {
  /** Features the kernel granted (the ones asked for that it supports). */
  features: number;
  /** Bitmask of the uffd ioctls available (bit _UFFDIO_xxx). */
  ioctls: number;
}

export interface ScanResult {
  /** [offset, length] pairs relative to `start`, ascending, adjacent runs merged. */
  runs: Float64Array;
  /** PAGEMAP_SCAN calls it took (the kernel may stop early; the scan loops). */
  calls: number;
  /** Pages reported written. */
  pages: number;
}

export interface WaitFaultsResult {
  /** Page-aligned faulting addresses, in arrival order (may repeat). */
  addresses: Float64Array;
  /** The cancel eventfd was signalled. */
  cancelled: boolean;
  /** The pidfd became readable: the process exited. */
  exited: boolean;
  timedOut: boolean;
  /** uffd messages that were not page faults (none are asked for). */
  otherEvents: number;
}

export interface RawConstants {
  UFFD_FEATURE_WP_HUGETLBFS_SHMEM: number;
  UFFD_FEATURE_WP_UNPOPULATED: number;
  UFFD_FEATURE_WP_ASYNC: number;
  UFFDIO_REGISTER_MODE_MISSING: number;
  UFFDIO_REGISTER_MODE_WP: number;
  /** Bit index of UFFDIO_COPY in an ioctls mask. */
  UFFDIO_COPY_IOCTL_BIT: number;
  /** Bit index of UFFDIO_WRITEPROTECT in an ioctls mask. */
  UFFDIO_WRITEPROTECT_IOCTL_BIT: number;
  /** PAGEMAP_SCAN page categories (linux/fs.h). */
  PAGE_IS_WPALLOWED: number;
  PAGE_IS_WRITTEN: number;
  PAGE_IS_FILE: number;
  PAGE_IS_PRESENT: number;
  /** Also set for uffd-wp pte markers (unpopulated pages write-protected with WP_UNPOPULATED). */
  PAGE_IS_SWAPPED: number;
  PAGE_IS_PFNZERO: number;
  PM_SCAN_WP_MATCHING: number;
  PM_SCAN_CHECK_WPASYNC: number;
}

/** A PAGEMAP_SCAN selection: a page matches when ((categories ^ categoryInverted) & categoryMask) == categoryMask and, if categoryAnyofMask != 0, (categories ^ categoryInverted) & categoryAnyofMask != 0. */
export interface ScanSpec {
  /** PM_SCAN_* flags; without PM_SCAN_WP_MATCHING nothing is re-protected. */
  flags?: number;
  categoryInverted?: number;
  categoryMask?: number;
  categoryAnyofMask?: number;
  /** Must not be 0. */
  returnMask: number;
}

export interface RawAddon {
  readonly pageSize: number;
  readonly constants: RawConstants;

  // process / fds
  pidfdOpen(pid: number): number;
  /** Duplicate `targetFd` of the process behind `pidfd` into this process. */
  pidfdGetfd(pidfd: number, targetFd: number): number;
  /** Signal the process behind `pidfd` (ESRCH once it exited, whatever now holds its PID). */
  pidfdSendSignal(pidfd: number, signal: number): void;
  close(fd: number): void;
  setNonblock(fd: number): void;
  eventfdCreate(): number;
  eventfdSignal(fd: number): void;

  // userfaultfd
  /** UFFDIO_API; allowed once per uffd (EINVAL after). */
  uffdApi(uffd: number, features: number): UffdApiResult;
  /** Features this kernel supports, from a throw-away uffd of this process. */
  probeUffdFeatures(): number;
  /** UFFDIO_REGISTER; returns the ioctls mask available on the range. */
  uffdRegister(uffd: number, start: number, len: number, mode: number): number;
  uffdUnregister(uffd: number, start: number, len: number): void;
  uffdWriteProtect(uffd: number, start: number, len: number, protect?: boolean): void;
  uffdWake(uffd: number, start: number, len: number): void;
  /** UFFDIO_COPY of src[srcOffset, +len) to dst; EEXIST pages skipped (then woken), EAGAIN retried. */
  uffdCopy(uffd: number, dst: number, src: Buffer, srcOffset: number, len: number): { copied: number; existed: number };
  /** poll() in the threadpool on uffd (+ cancel eventfd, + pidfd; -1 = none), then read all pending messages. */
  waitFaults(uffd: number, cancelFd: number, pidfd: number, timeoutMs: number): Promise<WaitFaultsResult>;

  // pagemap
  /** PAGEMAP_SCAN (WP_MATCHING | CHECK_WPASYNC, PAGE_IS_WRITTEN) looped until walk_end == end. */
  scanWritten(pagemapFd: number, start: number, end: number, vecLen?: number): ScanResult;
  /** General PAGEMAP_SCAN with the same loop (until walk_end == end) and result shape as scanWritten. */
  scanPages(pagemapFd: number, start: number, end: number, spec: ScanSpec, vecLen?: number): ScanResult;
  /** scanWritten over [offset, length] ranges relative to start (ascending): only they are walked. */
  scanWrittenIn(pagemapFd: number, start: number, ranges: Float64Array, vecLen?: number): ScanResult;
  /** Pages written in the ranges (relative to start), nothing re-protected. */
  countWrittenIn(pagemapFd: number, start: number, ranges: Float64Array): ScanResult;

  // memory
  /** MAP_SHARED mapping of fd as an external Buffer (finalizer munmaps). Read-only unless writable. */
  mmapFile(fd: number, len: number, offset: number, writable?: boolean): Buffer;
  /** Private anonymous memory, pre-faulted (MAP_POPULATE). */
  allocStaging(bytes: number): Buffer;
  /** Replace an addon mapping in place by zeros (drops the file/memory); false if buf is not one. */
  releaseMapping(buf: Buffer): boolean;
  /** memcpy each [offset, length] run of src, in order, contiguously into dst from dstOffset. */
  copyRuns(src: Buffer, runs: Float64Array, dst: Buffer, dstOffset?: number, maxThreads?: number): number;
  /** lseek SEEK_DATA / SEEK_HOLE; -1 when nothing at or after offset (ENXIO). */
  lseek(fd: number, offset: number, whence: 'data' | 'hole'): number;
  /**
   * `known` [offset, length] runs (relative to base, within size) plus the chunk-aligned chunks of the gaps
   * between them where SEEK_DATA finds data now; merged, ascending. Never SEEK_HOLE (it walks data on shmem).
   */
  extendDataRuns(fd: number, base: number, size: number, known: Float64Array, chunk: number): Float64Array;
  /** Each [offset, length] run of the file into the page cache (readahead, then read), in the threadpool; resolves with the bytes cached. */
  warmFileRuns(fd: number, runs: Float64Array): Promise<number>;
  /** POSIX_FADV_DONTNEED over the whole file: its clean pages leave the page cache. */
  dropFileCache(fd: number): void;
  /** flock(2) with LOCK_NB: true when taken, false when a conflicting lock is held elsewhere. */
  flock(fd: number, mode: 'ex' | 'sh' | 'un'): boolean;
  /**
   * process_vm_readv of each [offset, length] run at base+offset in process `pid`, in order, contiguously into
   * dst from dstOffset, batched by IOV_MAX; with limit, runs must lie in [0, limit). Partial reads are continued;
   * no progress throws (EFAULT; ESRCH when the process is gone) with `offset` (run offset that failed) and `bytesRead`.
   */
  processReadRuns(pid: number, base: number, runs: Float64Array, dst: Buffer, dstOffset?: number, limit?: number): number;
  bufferAddress(buf: Buffer): number;
}

export function isRawNativeError(e: unknown): e is RawNativeError {
  return e instanceof Error && typeof (e as Partial<RawNativeError>).errno === 'number' && typeof (e as Partial<RawNativeError>).syscall === 'string';
}
