// Whether a process id names a live process (a zombie counts as dead).
import fs from 'node:fs';

/**
 * True while `pid` exists and has not exited. EPERM means it exists under
 * another user. A zombie has exited and only waits for its parent to reap it,
 * so it counts as dead.
 */
export function pidAlive(pid: number | undefined | null): boolean {
  if (pid === undefined || pid === null || !Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

/**
 * The start time of process `pid` (field 22 of /proc/PID/stat, clock ticks
 * since boot), or undefined when there is no such process. A PID names the
 * same process only while this stays equal: record it when the process is
 * spawned, compare it before signalling.
 */
export function procStartTime(pid: number | undefined | null): string | undefined {
  if (pid === undefined || pid === null || !Number.isInteger(pid) || pid <= 0) return undefined;
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command name (which may hold spaces and parentheses): state is field 3.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

/**
 * SIGKILL `pid` if it is still the process that started at `startTime`, and
 * wait (blocking, up to `waitMs`) until it can run no more code. True once it
 * is gone (or was another process already).
 */
export function killRecordedAndWait(pid: number, startTime: string | undefined, waitMs = 2000): boolean {
  if (procStartTime(pid) !== startTime) return true;
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    return !pidAlive(pid);
  }
  const until = Date.now() + waitMs;
  while (Date.now() < until) {
    if (!pidAlive(pid) || procStartTime(pid) !== startTime) return true;
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 5);
  }
  return false;
}
