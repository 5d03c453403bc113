// What a checkpointer does when the store says a newer incarnation of its VM exists: kill its QEMU at once.
import type { Logger } from 'pino';
import { CheckpointError, type HydraError } from '../errors.js';
import { processStartTime } from '../tracker/index.js';

export interface ProtectedQemu {
  vm: string;
  generation: number;
  qemuPid: number;
  /** The QEMU's start time when protection began: a pid reused since then is never signalled. */
  qemuStartTime: number | undefined;
}

/**
 * A newer incarnation was registered at the store: this one must not run a
 * moment longer (two copies of one server on the network). SIGKILL QEMU at
 * once, but only the very process we protect: its start time must still
 * match, so a pid reused since is never hit.
 */
export function killFencedQemu(q: ProtectedQemu, err: HydraError, log: Logger): CheckpointError {
  const pid = q.qemuPid;
  const now = processStartTime(pid);
  let what: string;
  if (now !== undefined && now === q.qemuStartTime) {
    try {
      process.kill(pid, 'SIGKILL');
      what = `killed its QEMU (pid ${pid})`;
    } catch (e) {
      what = `could not kill its QEMU (pid ${pid}): ${(e as Error).message}`;
    }
  } else {
    what = `its QEMU (pid ${pid}) is already gone`;
  }
  log.error({ qemuPid: pid, generation: q.generation, err: err.message }, `fenced by a newer generation: ${what}`);
  return new CheckpointError('HYDRA_CKPT_FENCED', `VM ${q.vm} generation ${q.generation} was fenced by the store (${err.message}); the checkpointer ${what}`, { cause: err });
}
