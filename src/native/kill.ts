// Signalling a recorded PID only while it still names the process recorded: pidfd plus an identity check.
import fs from 'node:fs';
import os from 'node:os';
import { procStartTime } from '../util/pid.js';
import { loadNative } from './load.js';

/** Who the PID must be: its start time recorded at spawn, or (when none was recorded) words its command line holds. */
export interface ProcessIdentity {
  startTime?: string;
  cmdline?: string[];
}

function matches(pid: number, who: ProcessIdentity): boolean {
  if (who.startTime !== undefined) return procStartTime(pid) === who.startTime;
  if (who.cmdline?.length) {
    let args: string[];
    try {
      args = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    } catch {
      return false;
    }
    return who.cmdline.every((w) => args.includes(w));
  }
  return false;
}

/**
 * Send `signal` to `pid` only if it is still the process `who` describes.
 * A PID is reused once its process is reaped, so a PID read from a file may
 * name an unrelated process by now. The pidfd is opened first and the
 * identity checked after: if the check passes, the pidfd refers to that
 * process, and pidfd_send_signal cannot reach a successor that reuses the
 * PID later. Without the native addon, the check is made just before
 * process.kill (a window of microseconds instead of none).
 * Returns whether the signal was sent. With no identity at all, nothing is sent.
 */
export function killProcess(pid: number | undefined, who: ProcessIdentity, signal: NodeJS.Signals = 'SIGKILL'): boolean {
  if (!pid || !Number.isInteger(pid) || pid <= 0) return false;
  const signo = os.constants.signals[signal];
  let addon: ReturnType<typeof loadNative> | undefined;
  try {
    addon = loadNative();
  } catch {
    addon = undefined; // not built: fall back to check-then-kill below
  }
  if (addon) {
    let fd: number;
    try {
      fd = addon.pidfdOpen(pid);
    } catch {
      return false; // no such process
    }
    try {
      if (!matches(pid, who)) return false;
      addon.pidfdSendSignal(fd, signo);
      return true;
    } catch {
      return false; // exited between the check and the signal: nothing to kill
    } finally {
      addon.close(fd);
    }
  }
  if (!matches(pid, who)) return false;
  try {
    process.kill(pid, signal);
    return true;
  } catch {
    return false;
  }
}
