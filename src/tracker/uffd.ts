/**
 * Taking a userfaultfd out of a QEMU process (created there by the shim) and
 * mapping native failures to TrackerErrors.
 *
 * A uffd accepts UFFDIO_API once, so which one to take matters. The shim makes
 * two. /proc/PID/fdinfo/N shows each one's features ("API:\taa:FEATURES:IOCTLS",
 * FEATURES 0 = never initialised, bit 31 = initialised):
 *   'wp'       a uffd already set up for async write-protect (a tracker
 *              re-attaching), else a fresh one
 *   'missing'  a uffd initialised without WP features (a restore handler
 *              re-attaching, e.g. after a crash: the range is registered on it),
 *              else a fresh one
 */
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { TrackerError } from '../errors.js';
import { isRawNativeError, loadNative, type RawAddon } from '../native/index.js';

export const UFFD_FEATURE_INITIALIZED = 0x80000000;

export interface UffdInProcess {
  /** fd number inside the target process. */
  targetFd: number;
  /** Features from fdinfo (0: not initialised). */
  features: number;
}

export interface TakenUffd {
  fd: number;
  targetFd: number;
  features: number;
  /** pidfd of the process, kept to notice its exit and to pin its identity. */
  pidfd: number;
}

export function errnoText(e: unknown): string {
  if (isRawNativeError(e)) return e.message;
  if (e instanceof Error) return e.message;
  return String(e);
}

export function errnoCode(e: unknown): string | undefined {
  if (isRawNativeError(e)) return e.code;
  return (e as NodeJS.ErrnoException | undefined)?.code;
}

export function processGoneError(pid: number, what: string, cause?: unknown): TrackerError {
  return new TrackerError('HYDRA_TRACKER_PROCESS_GONE', `process ${pid} is gone: ${what}${cause ? `: ${errnoText(cause)}` : ''}`, { cause });
}

export function listUffds(pid: number): UffdInProcess[] {
  let names: string[];
  try {
    names = readdirSync(`/proc/${pid}/fd`);
  } catch (err) {
    const code = errnoCode(err);
    if (code === 'ENOENT' || code === 'ESRCH') throw processGoneError(pid, `listing /proc/${pid}/fd`, err);
    throw new TrackerError('HYDRA_TRACKER_PROC_FAILED', `listing /proc/${pid}/fd: ${errnoText(err)}`, { cause: err });
  }
  const out: UffdInProcess[] = [];
  for (const n of names) {
    let link: string;
    try {
      link = readlinkSync(`/proc/${pid}/fd/${n}`);
    } catch {
      continue; // closed meanwhile
    }
    if (link !== 'anon_inode:[userfaultfd]') continue;
    let features = -1;
    try {
      const m = /^API:\s*[0-9a-f]+:([0-9a-f]+):/m.exec(readFileSync(`/proc/${pid}/fdinfo/${n}`, 'utf8'));
      if (m) features = parseInt(m[1]!, 16);
    } catch {
      continue;
    }
    out.push({ targetFd: Number(n), features });
  }
  return out.sort((a, b) => a.targetFd - b.targetFd);
}

export function openPidfd(pid: number, native: RawAddon = loadNative()): number {
  try {
    return native.pidfdOpen(pid);
  } catch (err) {
    if (errnoCode(err) === 'ESRCH') throw processGoneError(pid, 'pidfd_open', err);
    throw new TrackerError('HYDRA_TRACKER_PROC_FAILED', `pidfd_open(${pid}): ${errnoText(err)}`, { cause: err });
  }
}

export function takeUffd(pid: number, purpose: 'wp' | 'missing', wpAsyncBit: number, native: RawAddon = loadNative()): TakenUffd {
  const pidfd = openPidfd(pid, native);
  try {
    const uffds = listUffds(pid);
    if (uffds.length === 0) {
      throw new TrackerError(
        'HYDRA_TRACKER_NO_UFFD',
        `process ${pid} has no userfaultfd: it was not started with LD_PRELOAD of the HydraVM shim (native/build/libhydra_shim.so), or the shim was refused userfaultfd() (non-root with vm.unprivileged_userfaultfd=0)`,
      );
    }
    const fresh = uffds.find((u) => u.features === 0);
    const reattach =
      purpose === 'wp'
        ? uffds.find((u) => u.features > 0 && (u.features & wpAsyncBit) !== 0)
        : uffds.find((u) => u.features === UFFD_FEATURE_INITIALIZED);
    const pick = reattach ?? fresh;
    if (!pick) {
      const seen = uffds.map((u) => `fd ${u.targetFd} features 0x${u.features.toString(16)}`).join(', ');
      throw new TrackerError(
        'HYDRA_TRACKER_NO_UFFD',
        `process ${pid} has no free userfaultfd for ${purpose === 'wp' ? 'write-protect tracking' : 'missing-page handling'}: all are already set up for something else (${seen}); the shim makes HYDRAVM_SHIM_UFFDS (default 2)`,
      );
    }
    let fd: number;
    try {
      fd = native.pidfdGetfd(pidfd, pick.targetFd);
    } catch (err) {
      if (errnoCode(err) === 'ESRCH') throw processGoneError(pid, `pidfd_getfd of its fd ${pick.targetFd}`, err);
      throw new TrackerError('HYDRA_TRACKER_PROC_FAILED', `pidfd_getfd(${pid}, fd ${pick.targetFd}): ${errnoText(err)}`, { cause: err });
    }
    return { fd, targetFd: pick.targetFd, features: pick.features, pidfd };
  } catch (err) {
    native.close(pidfd);
    throw err;
  }
}
