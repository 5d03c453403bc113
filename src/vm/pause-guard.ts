// The supervisor's guard for checkpoint pauses: a VM left paused by a checkpointer that died or hung inside its pause runs again.
import fs from 'node:fs';
import type { Logger } from 'pino';
import { killRecordedAndWait, pidAlive, procStartTime } from '../util/pid.js';

/**
 * HOME/vms/NAME/pause-guard.json names the checkpointer that has stopped the
 * VM for a checkpoint. It is written just before `stop` and removed once
 * `cont` is answered. A checkpointer that dies between the two (SIGKILL, OOM,
 * a crash) or hangs there would leave the guest paused for good, which for the
 * guest's users is an outage nobody notices. The supervisor outlives the
 * checkpointer, so it checks every 50 ms:
 * - the named process is gone: `cont` at once (the checkpoint it was taking was
 *   never committed, so nothing is lost; protection reports the VM unprotected);
 * - it lives but the pause has lasted PAUSE_LIMIT_MS: it is killed first (so it
 *   can neither copy memory it believes frozen nor commit), then `cont`.
 * A `cont` for a VM that already runs (the checkpointer died right after its
 * own `cont`) changes nothing.
 */
export interface PauseGuardRecord {
  pid: number;
  startTime: string | undefined;
  /** Epoch ms when the checkpointer stopped the VM. */
  since: number;
}

/** Longest a checkpoint may hold the VM paused before the supervisor intervenes (HYDRAVM_PAUSE_LIMIT_MS overrides). */
export const PAUSE_LIMIT_MS = 5000;

function pauseLimitMs(): number {
  const v = Number(process.env.HYDRAVM_PAUSE_LIMIT_MS);
  return Number.isFinite(v) && v > 0 ? v : PAUSE_LIMIT_MS;
}

export function writePauseGuard(file: string): void {
  const rec: PauseGuardRecord = { pid: process.pid, startTime: procStartTime(process.pid), since: Date.now() };
  fs.writeFileSync(file, JSON.stringify(rec) + '\n', { mode: 0o600 });
}

export function clearPauseGuard(file: string): void {
  fs.rmSync(file, { force: true });
}

export interface PauseGuard {
  stop(): void;
}

/** `resume` sends `cont` to the VM's QEMU; it throws when QEMU cannot be reached. */
export function guardCheckpointPause(file: string, resume: () => Promise<void>, log: Logger, everyMs = 50): PauseGuard {
  const limitMs = pauseLimitMs();
  let busy = false;
  const check = async () => {
    let rec: PauseGuardRecord;
    try {
      rec = JSON.parse(fs.readFileSync(file, 'utf8')) as PauseGuardRecord;
    } catch {
      return; // no checkpoint pause (the usual case), or a record being written right now
    }
    const dead = procStartTime(rec.pid) !== rec.startTime || !pidAlive(rec.pid);
    const heldMs = Date.now() - rec.since;
    if (!dead && heldMs < limitMs) return;
    if (!dead && !killRecordedAndWait(rec.pid, rec.startTime)) {
      log.error({ checkpointerPid: rec.pid, heldMs }, 'a checkpointer holding the VM paused did not die after SIGKILL; the VM stays paused');
      return;
    }
    try {
      await resume();
    } catch (err) {
      log.error({ err: (err as Error).message, checkpointerPid: rec.pid }, 'could not resume the VM after its checkpointer left it paused');
      return;
    }
    clearPauseGuard(file);
    if (dead) log.warn({ checkpointerPid: rec.pid, heldMs }, 'checkpointer died inside its pause: VM resumed');
    else log.error({ checkpointerPid: rec.pid, heldMs, limitMs }, `checkpointer held the VM paused for ${heldMs} ms (limit ${limitMs} ms): killed it and resumed the VM`);
  };
  const timer = setInterval(() => {
    if (busy) return;
    busy = true;
    check().finally(() => { busy = false; });
  }, everyMs);
  timer.unref();
  return { stop: () => clearInterval(timer) };
}
