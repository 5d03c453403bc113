// One userfaultfd session on a QEMU process's guest RAM: the process (pidfd), a uffd taken from it, the RAM file, and closing them.
import { closeSync, constants as fsConstants, fstatSync, openSync } from 'node:fs';
import { TrackerError } from '../errors.js';
import { loadNative, type RawAddon } from '../native/index.js';
import { findGuestRam, mappingStillThere, processStartTime, type GuestRamMapping, type GuestRamSelector } from './guest-ram.js';
import { errnoText, processGoneError, takeUffd } from './uffd.js';

/**
 * What the dirty tracker (write-protect) and the missing-page handler share:
 * find the guest RAM mapping, take one of QEMU's userfaultfds (from the shim)
 * with a pidfd on the process, open the RAM file through the mapping. Each
 * user arms the uffd in its own mode and adds what it opens with onClose().
 */
export class UffdSession {
  readonly native: RawAddon;
  readonly pid: number;
  /** The process's start time at open: a different one later means the pid was reused. */
  readonly startTime: number | undefined;
  readonly mapping: GuestRamMapping;
  readonly uffd: number;
  readonly pidfd: number;
  /** The uffd's number in QEMU. */
  readonly targetFd: number;
  /** Features already negotiated on the uffd (0: UFFDIO_API is still to be done). */
  readonly features: number;
  readonly ramFd: number;
  readonly ramIno: number;
  readonly #undo: Array<() => void> = [];
  #closed = false;

  private constructor(a: {
    native: RawAddon; pid: number; startTime: number | undefined; mapping: GuestRamMapping;
    uffd: number; pidfd: number; targetFd: number; features: number; ramFd: number; ramIno: number;
  }) {
    this.native = a.native;
    this.pid = a.pid;
    this.startTime = a.startTime;
    this.mapping = a.mapping;
    this.uffd = a.uffd;
    this.pidfd = a.pidfd;
    this.targetFd = a.targetFd;
    this.features = a.features;
    this.ramFd = a.ramFd;
    this.ramIno = a.ramIno;
  }

  /**
   * Open a session for `purpose` on process `pid`. `check` sees the RAM
   * mapping before a uffd is taken (to refuse it early). Nothing stays open
   * when it throws.
   */
  static open(pid: number, purpose: 'wp' | 'missing', sel: GuestRamSelector, check?: (m: GuestRamMapping) => void): UffdSession {
    const native = loadNative();
    const startTime = processStartTime(pid);
    if (startTime === undefined) throw processGoneError(pid, `no live process ${pid}`);
    const mapping = findGuestRam(pid, sel);
    check?.(mapping);
    const taken = takeUffd(pid, purpose, native.constants.UFFD_FEATURE_WP_ASYNC, native);
    const release = () => {
      for (const fd of [taken.fd, taken.pidfd]) {
        try { native.close(fd); } catch { /* closing what we opened: nothing else to do */ }
      }
    };
    let ramFd: number;
    try {
      // The RAM file, through the mapping itself (root: map_files).
      ramFd = openSync(mapping.mapFilesPath, fsConstants.O_RDONLY);
    } catch (err) {
      release();
      if (processStartTime(pid) !== startTime) throw processGoneError(pid, `opening ${mapping.mapFilesPath}`, err);
      throw new TrackerError('HYDRA_TRACKER_RANGE_CHANGED', `process ${pid}: guest RAM mapping ${mapping.mapFilesPath} vanished while attaching: ${errnoText(err)}`, { cause: err });
    }
    let ramIno: number;
    try {
      ramIno = fstatSync(ramFd).ino;
    } catch (err) {
      closeSync(ramFd);
      release();
      throw err;
    }
    return new UffdSession({ native, pid, startTime, mapping, uffd: taken.fd, pidfd: taken.pidfd, targetFd: taken.targetFd, features: taken.features, ramFd, ramIno });
  }

  /** Undo `fn` when the session closes (in reverse order of registration). */
  onClose(fn: () => void): void {
    this.#undo.push(fn);
  }

  /** True while the process is the one opened (alive, same start time, not a zombie). */
  isAlive(): boolean {
    return processStartTime(this.pid) === this.startTime;
  }

  /** Cheap check that the RAM mapping is still the one opened. */
  mappingUnchanged(): boolean {
    return mappingStillThere(this.mapping, this.ramIno);
  }

  /** Run the undo steps, then close the RAM file, the uffd and the pidfd. Best effort, idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const f of this.#undo.reverse()) {
      try { f(); } catch { /* best effort: the process or the fd is already gone */ }
    }
    try { closeSync(this.ramFd); } catch { /* already closed */ }
    for (const fd of [this.pidfd, this.uffd]) {
      try { this.native.close(fd); } catch { /* already closed */ }
    }
  }
}
