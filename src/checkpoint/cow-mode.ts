// Which checkpoint mode a protection request gets, and clean-up after a killed copy-on-write checkpointer.
import { findGuestRam, releaseOrphanedCow } from '../tracker/index.js';
import { readState, isLive, type LaunchFile } from '../vm/index.js';
import { vmLog } from '../util/log.js';
import { DEFAULT_COW_GRAIN, DEFAULT_COW_MAX_SPILL, DEFAULT_COW_STAGING, type CowSettings } from './cow-checkpointer.js';

export { CowCheckpointer } from './cow-checkpointer.js';

/**
 * Copy-on-write settings for a request, or undefined for basic mode. The
 * request wins over the VM's spec. A VM restored in file mode runs on a
 * private mapping of the image, which the copy-on-write copier cannot read
 * through a shared view: it is checkpointed in basic mode (logged).
 */
export function cowSettings(req: { vm: string; cow?: false | { grain?: number; stagingBytes?: number; maxSpillBytes?: number } }, config: LaunchFile, qemuPid: number): CowSettings | undefined {
  const fromSpec = config.spec.protection;
  if (req.cow === false) return undefined;
  if (req.cow === undefined && !fromSpec?.cow) return undefined;
  if (findGuestRam(qemuPid).kind !== 'shared') {
    vmLog(req.vm).warn('copy-on-write asked for, but guest RAM is a private file mapping (file-mode restore): using basic checkpoints');
    return undefined;
  }
  const r = req.cow ?? {};
  return {
    grain: r.grain ?? fromSpec?.grainBytes ?? DEFAULT_COW_GRAIN,
    stagingBytes: r.stagingBytes ?? DEFAULT_COW_STAGING,
    maxSpillBytes: r.maxSpillBytes ?? DEFAULT_COW_MAX_SPILL,
  };
}

/**
 * After its copy-on-write checkpointer was killed, a VM's guest RAM stays
 * write-protected on a uffd its QEMU holds: the next write to a protected
 * grain would wait forever. Unregistering the range lets every writer go on.
 */
export function releaseCowOf(vm: string): void {
  const state = readState(vm);
  if (!state?.qemuPid || !isLive(state)) return;
  try {
    if (releaseOrphanedCow(state.qemuPid)) vmLog(vm).warn('released guest RAM left write-protected by a stopped copy-on-write checkpointer');
  } catch (err) {
    vmLog(vm).warn({ err: (err as Error).message }, 'could not release copy-on-write protection left by a stopped checkpointer');
  }
}
