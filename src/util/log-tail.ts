// The last lines of a log file, for error messages that must say what a dead child process said last.
import fs from 'node:fs';

/** The last `n` non-empty lines of `file` joined by " | " (only its last 64 KiB are read); "(no output)" if none. */
export function lastLines(file: string, n = 3): string {
  let fd: number | undefined;
  try {
    fd = fs.openSync(file, 'r');
    const size = fs.fstatSync(fd).size;
    const len = Math.min(size, 64 * 1024);
    const buf = Buffer.alloc(len);
    fs.readSync(fd, buf, 0, len, size - len);
    const lines = buf.toString('utf8').trim().split('\n').filter(Boolean);
    return lines.slice(-n).join(' | ') || '(no output)';
  } catch {
    return '(no output)';
  } finally {
    if (fd !== undefined) fs.closeSync(fd);
  }
}
