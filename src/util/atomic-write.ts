// The one atomic file writer: write a temp file, fsync it, rename it over the target, fsync the directory; errors name the failing step.
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { step, stepSync } from './io-step.js';

export interface AtomicWriteHooks {
  /** Write `data` into the open temp file (default: all of it); the store's crash injection tears it here. */
  write?: (fh: fsp.FileHandle, data: Buffer, tmp: string) => Promise<void>;
  /** Called after the temp file is durable, before the rename. */
  beforeRename?: () => void;
  /** Called after the rename, before the directory is fsynced. */
  beforeDirSync?: () => void;
  /** false: skip both fsyncs (advisory files a crash may lose). Default true. */
  durable?: boolean;
  /** The file's mode, set whatever the umask (e.g. 0o600 for files holding guest data). Default: 0o666 less the umask. */
  mode?: number;
}

/** fsync a directory, so a rename or create in it survives a host crash. */
export async function fsyncDir(dir: string): Promise<void> {
  await step('fsync directory', dir, async () => {
    const fh = await fsp.open(dir, 'r');
    try {
      await fh.sync();
    } finally {
      await fh.close();
    }
  });
}

/** Atomically replace `file` with `data` (readers see the old or the new content, never a mix). */
export async function writeFileAtomic(file: string, data: string | Buffer, hooks: AtomicWriteHooks = {}): Promise<void> {
  const buf = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
  const tmp = `${file}.tmp-${process.pid}`;
  const durable = hooks.durable ?? true;
  await step('write', tmp, async () => {
    const fh = await fsp.open(tmp, 'w', hooks.mode ?? 0o666);
    try {
      if (hooks.mode !== undefined) await fh.chmod(hooks.mode);
      if (hooks.write) await hooks.write(fh, buf, tmp);
      else await fh.writeFile(buf);
      if (durable) await step('fsync', tmp, () => fh.sync());
    } finally {
      await fh.close();
    }
  });
  hooks.beforeRename?.();
  await step('rename', `${tmp} -> ${file}`, () => fsp.rename(tmp, file));
  hooks.beforeDirSync?.();
  if (durable) await fsyncDir(path.dirname(file));
}

/**
 * writeFileAtomic for synchronous callers. `durable: false` skips the fsyncs:
 * for files that describe live processes (a host crash ends those anyway) and
 * are rewritten often.
 */
export function writeFileAtomicSync(file: string, data: string | Buffer, opts: { durable?: boolean } = {}): void {
  const tmp = `${file}.tmp-${process.pid}`;
  const durable = opts.durable ?? true;
  const fd = stepSync('create', tmp, () => fs.openSync(tmp, 'w'));
  try {
    stepSync('write', tmp, () => fs.writeFileSync(fd, data));
    if (durable) stepSync('fsync', tmp, () => fs.fsyncSync(fd));
  } finally {
    fs.closeSync(fd);
  }
  stepSync('rename', `${tmp} -> ${file}`, () => fs.renameSync(tmp, file));
  if (!durable) return;
  const dir = path.dirname(file);
  const dfd = stepSync('open directory', dir, () => fs.openSync(dir, 'r'));
  try {
    stepSync('fsync directory', dir, () => fs.fsyncSync(dfd));
  } finally {
    fs.closeSync(dfd);
  }
}
