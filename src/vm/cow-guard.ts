// The supervisor's guard for copy-on-write protection: a dead CoW checkpointer's write protection is released at once.
import fs from 'node:fs';
import type { Logger } from 'pino';
import { releaseOrphanedCow } from '../tracker/index.js';
import { killRecordedAndWait, pidAlive, procStartTime } from '../util/pid.js';

/**
 * HOME/vms/NAME/cow-guard.json names the copy-on-write checkpointer that
 * holds the guest's RAM write-protected in sync mode. Guest writes to a
 * protected page wait for that process's fault handler; if it dies (SIGKILL,
 * OOM), nobody answers them and the guest stalls. The supervisor outlives the
 * checkpointer, so it checks the named process every 50 ms and, once it is
 * gone, takes the uffd from QEMU and lifts the protection. The checkpoint the
 * dead process was taking was never committed, so nothing is lost: the next
 * protection starts with a full checkpoint.
 *
 * A checkpointer that lives but does not serve (stopped, starved, hung) is
 * caught too: a QEMU thread that waits in the kernel's userfault handler
 * without a context switch for COW_STALL_LIMIT_MS means a guest write has
 * waited that long. The guard kills the checkpointer first (so nothing it
 * copies after the release can reach a checkpoint), then lifts the
 * protection. A guest write therefore waits at most the limit plus one poll
 * and the kill.
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

/** The longest a guest write may wait on the copy-on-write fault handler (HYDRAVM_COW_STALL_MS overrides). */
export const COW_STALL_LIMIT_MS = 2000;

function stallLimitMs(): number {
  const v = Number(process.env.HYDRAVM_COW_STALL_MS);
  return Number.isFinite(v) && v > 0 ? v : COW_STALL_LIMIT_MS;
}

/** QEMU's threads now waiting in handle_userfault, with their voluntary context switch counts. */
function userfaultWaiters(qemuPid: number): Map<string, string> {
  const out = new Map<string, string>();
  let tids: string[];
  try {
    tids = fs.readdirSync(`/proc/${qemuPid}/task`);
  } catch {
    return out; // QEMU gone: nobody waits
  }
  for (const tid of tids) {
    try {
      if (fs.readFileSync(`/proc/${qemuPid}/task/${tid}/wchan`, 'utf8') !== 'handle_userfault') continue;
      const m = /voluntary_ctxt_switches:\s*(\d+)/.exec(fs.readFileSync(`/proc/${qemuPid}/task/${tid}/status`, 'utf8'));
      out.set(tid, m?.[1] ?? '?');
    } catch {
      /* thread exited between the listing and the read */
    }
  }
  return out;
}

export interface CowGuard {
  stop(): void;
}

export function guardCowProtection(file: string, qemuPid: () => number | undefined, log: Logger, everyMs = 50): CowGuard {
  const limitMs = stallLimitMs();
  // tid -> (context switches, first seen waiting with them)
  let waiting = new Map<string, { csw: string; since: number }>();
  const release = (rec: CowGuardRecord, why: 'died' | 'stalled', waitedMs?: number) => {
    const pid = qemuPid();
    let released = false;
    try {
      released = pid !== undefined && releaseOrphanedCow(pid);
    } catch (err) {
      log.error({ err: (err as Error).message, checkpointerPid: rec.pid }, 'could not release the write protection of a copy-on-write checkpointer');
    }
    clearCowGuard(file);
    waiting = new Map();
    if (why === 'died') log.warn({ checkpointerPid: rec.pid, released }, 'copy-on-write checkpointer died: guest RAM write protection released');
    else log.error({ checkpointerPid: rec.pid, released, waitedMs, limitMs }, `copy-on-write checkpointer stalled: a guest write waited ${Math.round(waitedMs ?? 0)} ms (limit ${limitMs} ms); killed it and released guest RAM write protection`);
  };
  const check = () => {
    let rec: CowGuardRecord;
    try {
      rec = JSON.parse(fs.readFileSync(file, 'utf8')) as CowGuardRecord;
    } catch {
      waiting = new Map();
      return; // no CoW checkpointer (the usual case), or one writing its record right now
    }
    const alive = procStartTime(rec.pid);
    if (alive === undefined || alive !== rec.startTime || !pidAlive(rec.pid)) return release(rec, 'died');
    const pid = qemuPid();
    if (pid === undefined) return;
    const now = Date.now();
    const next = new Map<string, { csw: string; since: number }>();
    let longest = 0;
    for (const [tid, csw] of userfaultWaiters(pid)) {
      const prev = waiting.get(tid);
      // Same count of context switches: the same wait, not a new fault.
      const since = prev && prev.csw === csw ? prev.since : now;
      next.set(tid, { csw, since });
      longest = Math.max(longest, now - since);
    }
    waiting = next;
    if (longest < limitMs) return;
    if (!killRecordedAndWait(rec.pid, rec.startTime)) {
      log.error({ checkpointerPid: rec.pid }, 'a stalled copy-on-write checkpointer did not die after SIGKILL; guest RAM stays write-protected');
      return;
    }
    release(rec, 'stalled', longest);
  };
  const timer = setInterval(check, everyMs);
  timer.unref();
  return { stop: () => clearInterval(timer) };
}
