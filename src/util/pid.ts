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
