/** Small file-system steps, each failing with an error that names the step and the file. */
import fs from 'node:fs/promises';
import path from 'node:path';
import { ioStepError } from '../errors.js';
import { fsyncDir, writeFileAtomic as writeAtomic } from '../util/atomic-write.js';
import { step } from '../util/io-step.js';
import type { FaultInjector, CrashPoint } from './faults.js';

export { step } from '../util/io-step.js';
export { fsyncDir } from '../util/atomic-write.js';

/**
 * Store files hold guest RAM: owner-only whatever the umask (mode bits given to
 * open/mkdir are masked by it, so they are set again explicitly).
 */
export const FILE_MODE = 0o600;
export const DIR_MODE = 0o700;

/** mkdir -p where every directory this call creates is 0700 (existing ones are left as they are). */
export async function mkdirPrivate(dir: string): Promise<void> {
  await step('mkdir', dir, async () => {
    const first = await fs.mkdir(dir, { recursive: true, mode: DIR_MODE });
    if (first === undefined) return;
    for (let d = dir; ; d = path.dirname(d)) {
      await fs.chmod(d, DIR_MODE);
      if (d === first || path.dirname(d) === d) break;
    }
  });
}

/** fs.open for a file the store creates: 0600 whatever the umask. */
export async function openPrivate(file: string, flags: string): Promise<fs.FileHandle> {
  const fh = await fs.open(file, flags, FILE_MODE);
  try {
    await fh.chmod(FILE_MODE);
  } catch (err) {
    await fh.close();
    throw err;
  }
  return fh;
}

/** fs.writeFile for a small file the store creates: 0600 whatever the umask. */
export async function writeFilePrivate(file: string, data: string | Buffer): Promise<void> {
  const fh = await openPrivate(file, 'w');
  try {
    await fh.writeFile(data);
  } finally {
    await fh.close();
  }
}

/**
 * mkdir with the store's mode; whether it was created here (false: it
 * existed). Not durable until its parent directory is fsynced: the caller
 * does that.
 */
export async function mkdirOnce(dir: string): Promise<boolean> {
  let created = false;
  await step('mkdir', dir, async () => {
    try {
      await fs.mkdir(dir, { mode: DIR_MODE });
      await fs.chmod(dir, DIR_MODE);
      created = true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
  });
  return created;
}

/** Write all of `buf` at `position`, crash-injectable (a due crash writes half then dies). */
export async function pwriteAll(fh: fs.FileHandle, buf: Buffer, position: number, file: string, faults?: FaultInjector, point?: CrashPoint): Promise<void> {
  if (faults && point) await faults.hitWrite(point, async () => { await fh.write(buf, 0, buf.length >> 1, position); });
  await step('write', file, async () => {
    let off = 0;
    while (off < buf.length) {
      const { bytesWritten } = await fh.write(buf, off, buf.length - off, position + off);
      if (bytesWritten <= 0) throw ioStepError('write', file, { message: `short write (${off} of ${buf.length} bytes)` });
      off += bytesWritten;
    }
  });
}

export async function preadAll(fh: fs.FileHandle, buf: Buffer, position: number, file: string): Promise<void> {
  await step('read', file, async () => {
    let off = 0;
    while (off < buf.length) {
      const { bytesRead } = await fh.read(buf, off, buf.length - off, position + off);
      if (bytesRead === 0) {
        buf.fill(0, off); // past EOF of a sparse image: zeros
        return;
      }
      off += bytesRead;
    }
  });
}

/**
 * Atomically replace `file` with `data` (util/atomic-write.ts), with the
 * store's crash points: meta-write (torn temp), meta-rename, meta-dirsync.
 */
export async function writeFileAtomic(file: string, data: Buffer, faults?: FaultInjector): Promise<void> {
  await writeAtomic(file, data, {
    mode: FILE_MODE,
    write: (fh, buf, tmp) => pwriteAll(fh, buf, 0, tmp, faults, 'meta-write'),
    beforeRename: () => faults?.hit('meta-rename'),
    beforeDirSync: () => faults?.hit('meta-dirsync'),
  });
}

export async function exists(p: string): Promise<boolean> {
  try {
    await fs.access(p);
    return true;
  } catch {
    return false;
  }
}

/** A tiny async mutex (FIFO). */
export class Mutex {
  private tail: Promise<void> = Promise.resolve();
  async run<T>(fn: () => Promise<T>): Promise<T> {
    const prev = this.tail;
    let release!: () => void;
    this.tail = new Promise<void>((r) => (release = r));
    await prev;
    try {
      return await fn();
    } finally {
      release();
    }
  }
}
