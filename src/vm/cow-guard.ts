// The supervisor's guard for copy-on-write protection: a dead CoW checkpointer's write protection is released at once.
import fs from 'node:fs';
import type { Logger } from 'pino';
import { releaseOrphanedCow } from '../tracker/index.js';
import { procStartTime } from '../util/pid.js';

/**
 * HOME/vms/NAME/cow-guard.json names the copy-on-write checkpointer that
 * holds the guest's RAM write-protected in sync mode. Guest writes to a
 * protected page wait for that process's fault handler; if it dies (SIGKILL,
 * OOM), nobody answers them and the guest stalls. The supervisor outlives the
 * checkpointer, so it checks the named process every 50 ms and, once it is
 * gone, takes the uffd from QEMU and lifts the protection. The checkpoint the
 * dead process was taking was never committed, so nothing is lost: the next
 * protection starts with a full checkpoint.
 */
export interface CowGuardRecord {
  /** The checkpointer's pid and start time (a reused pid is not it). */
  pid: number;
  startTime: string | undefined;
}

export function writeCowGuard(file: string): void {
  const rec: CowGuardRecord = { pid: process.pid, startTime: procStartTime(process.pid) };
  fs.writeFileSync(file, JSON.stringify(rec) + '\n', { mode: 0o600 });
}

export function clearCowGuard(file: string): void {
  fs.rmSync(file, { force: true });
}

export interface CowGuard {
  stop(): void;
}

export function guardCowProtection(file: string, qemuPid: () => number | undefined, log: Logger, everyMs = 50): CowGuard {
  const check = () => {
    let rec: CowGuardRecord;
    try {
      rec = JSON.parse(fs.readFileSync(file, 'utf8')) as CowGuardRecord;
    } catch {
      return; // no CoW checkpointer (the usual case), or one writing its record right now
    }
    const alive = procStartTime(rec.pid);
    if (alive !== undefined && alive === rec.startTime) return;
    const pid = qemuPid();
    let released = false;
    try {
      released = pid !== undefined && releaseOrphanedCow(pid);
    } catch (err) {
      log.error({ err: (err as Error).message, checkpointerPid: rec.pid }, 'could not release the write protection of a dead copy-on-write checkpointer');
    }
    clearCowGuard(file);
    log.warn({ checkpointerPid: rec.pid, released }, 'copy-on-write checkpointer died: guest RAM write protection released');
  };
  const timer = setInterval(check, everyMs);
  timer.unref();
  return { stop: () => clearInterval(timer) };
}
