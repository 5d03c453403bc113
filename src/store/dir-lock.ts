// The store directory's lock: flock(2) on DIR/store.lock, exclusive for the one process that writes, shared for offline readers.
/**
 * A pid file alone cannot tell whether a process on another host serves the
 * directory. flock(2) is kept by the kernel (and by the file server for NFSv4,
 * CephFS, GlusterFS, which map it to their own locks), released when the holder
 * dies, and needs no clean-up. The file's content ("pid host startedAt") only
 * names the holder in the error a second opener gets; it is never trusted.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { StoreError } from '../errors.js';
import { loadNative } from '../native/index.js';
import { openPrivate, step, writeFilePrivate } from './fsutil.js';

export const LOCK_FILE = 'store.lock';

export class DirLock {
  private constructor(private fh: fs.FileHandle | null, readonly mode: 'ex' | 'sh', readonly file: string) {}

  /** The exclusive lock a read-write store holds for its whole life. Throws HYDRA_STORE_DIR_BUSY naming the holder. */
  static async exclusive(dir: string): Promise<DirLock> {
    const l = await DirLock.tryExclusive(dir);
    if (!l) throw new StoreError('HYDRA_STORE_DIR_BUSY', `store directory ${dir} is already open read-write or being read by ${await holder(dir)} (${path.join(dir, LOCK_FILE)}); only one store may serve a directory`);
    return l;
  }

  /** The exclusive lock if it is free now (a standby store polls with this), else null. */
  static async tryExclusive(dir: string): Promise<DirLock | null> {
    const l = await DirLock.tryTake(dir, 'ex');
    if (!l) return null;
    try {
      await step('write', l.file, () => writeFilePrivate(l.file, `${process.pid} ${os.hostname()} ${new Date().toISOString()}\n`));
    } catch (err) {
      await l.release();
      throw err;
    }
    return l;
  }

  /** Take the lock in `mode` without waiting; null when another process holds a conflicting one. */
  static async tryTake(dir: string, mode: 'ex' | 'sh'): Promise<DirLock | null> {
    const file = path.join(dir, LOCK_FILE);
    // The descriptor that holds the lock is read-only: an open-for-write file would keep the
    // file system from being remounted read-only, and a reader on a read-only mount must still lock.
    await step('create', file, async () => {
      try {
        await (await openPrivate(file, 'a')).close();
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (mode === 'ex' || (code !== 'EACCES' && code !== 'EROFS')) throw err;
      }
    });
    const fh = await step('open', file, () => fs.open(file, 'r'));
    let taken: boolean;
    try {
      taken = loadNative().flock(fh.fd, mode);
    } catch (err) {
      await fh.close();
      throw new StoreError('HYDRA_STORE_DIR_BUSY', `cannot lock ${file}: ${(err as Error).message}`, { cause: err });
    }
    if (!taken) {
      await fh.close();
      return null;
    }
    return new DirLock(fh, mode, file);
  }

  async release(): Promise<void> {
    const fh = this.fh;
    this.fh = null;
    // Closing the descriptor drops the lock; a failed close leaves nothing the exit does not free.
    if (fh) await fh.close().catch(() => undefined);
  }
}

/** Who holds the lock, as its holder wrote it (for messages only). */
export async function holder(dir: string): Promise<string> {
  try {
    const [pid, host, since] = (await fs.readFile(path.join(dir, LOCK_FILE), 'utf8')).trim().split(/\s+/);
    return pid ? `process ${pid} on host ${host ?? '?'}${since ? ` (since ${since})` : ''}` : 'an offline reader';
  } catch {
    return 'another process';
  }
}
