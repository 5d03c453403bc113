// Which checkpoint mode a protection request gets, and clean-up after a killed copy-on-write checkpointer.
import { constants as bufferConstants } from 'node:buffer';
import { findGuestRam, releaseOrphanedCow } from '../tracker/index.js';
import { readState, isLive, type LaunchFile } from '../vm/index.js';
import { vmLog } from '../util/log.js';
import { DEFAULT_COW_GRAIN, DEFAULT_COW_MAX_SPILL, DEFAULT_COW_STAGING, type CowSettings } from './cow-checkpointer.js';

export { CowCheckpointer } from './cow-checkpointer.js';

/**
 * Why a VM restored in file mode is checkpointed in basic mode even when
 * copy-on-write is asked for. Its RAM is a private mapping of the image file
 * (pages load from the page cache on first touch). Catching a write before it
 * lands needs userfaultfd write-protect in sync mode, and the kernel allows
 * that only on anonymous, shmem and hugetlb memory; on any other file mapping
 * it allows write-protect only in async mode (what basic mode uses), which
 * records writes but does not stop them. A network-mode restore runs on
 * shared memory and keeps copy-on-write.
 */
export const COW_PRIVATE_RAM_REASON = 'guest RAM is a private mapping of the image file (a file-mode restore): the kernel offers only async write-protect there, which cannot hold a write until its page is copied; restore in network mode to keep copy-on-write';

/**
 * Why a VM with more guest RAM than one Node Buffer can view is checkpointed
 * in basic mode: the copy-on-write copier works on one mapping of all of RAM.
 * Basic mode maps RAM in parts and has no such limit.
 */
export function cowTooLargeReason(bytes: number): string {
  return `guest RAM is ${(bytes / 2 ** 30).toFixed(1)} GiB; copy-on-write checkpoints support up to ${(bufferConstants.MAX_LENGTH / 2 ** 30).toFixed(0)} GiB (one mapping of all of RAM): basic checkpoints have no such limit`;
}

/**
 * Copy-on-write settings for a request (`settings`), or none for basic mode;
 * `refused` says why copy-on-write was asked for and not given. The request
 * wins over the VM's spec.
 */
export function cowSettings(req: { vm: string; cow?: false | { grain?: number; stagingBytes?: number; maxSpillBytes?: number } }, config: LaunchFile, qemuPid: number): { settings?: CowSettings; refused?: string } {
  const fromSpec = config.spec.protection;
  if (req.cow === false) return {};
  if (req.cow === undefined && !fromSpec?.cow) return {};
  const ram = findGuestRam(qemuPid);
  if (ram.kind !== 'shared') {
    vmLog(req.vm).warn({ reason: COW_PRIVATE_RAM_REASON }, 'copy-on-write asked for: using basic checkpoints');
    return { refused: COW_PRIVATE_RAM_REASON };
  }
  if (ram.size > bufferConstants.MAX_LENGTH) {
    const reason = cowTooLargeReason(ram.size);
    vmLog(req.vm).warn({ reason }, 'copy-on-write asked for: using basic checkpoints');
    return { refused: reason };
  }
  const r = req.cow ?? {};
  return {
    settings: {
      grain: r.grain ?? fromSpec?.grainBytes ?? DEFAULT_COW_GRAIN,
      stagingBytes: r.stagingBytes ?? DEFAULT_COW_STAGING,
      maxSpillBytes: r.maxSpillBytes ?? DEFAULT_COW_MAX_SPILL,
    },
  };
}

/**
 * After its copy-on-write checkpointer was killed, a VM's guest RAM stays
 * write-protected on a uffd its QEMU holds: the next write to a protected
 * grain would wait forever. Unregistering the range lets every writer go on.
 * alsoAsync (right before a new checkpointer starts, none living): also the
 * async registration a killed basic checkpointer left, which would make the
 * new tracker's registration fail as busy.
 */
export function releaseCowOf(vm: string, opts: { alsoAsync?: boolean } = {}): void {
  const state = readState(vm);
  if (!state?.qemuPid || !isLive(state)) return;
  try {
    if (releaseOrphanedCow(state.qemuPid, opts)) vmLog(vm).warn('released guest RAM left registered for write-protect by a stopped checkpointer');
  } catch (err) {
    vmLog(vm).warn({ err: (err as Error).message }, 'could not release copy-on-write protection left by a stopped checkpointer');
  }
}
