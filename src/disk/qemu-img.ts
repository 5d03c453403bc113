import { execFile } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { DiskError } from '../errors.js';

/** Result of one qemu-img run. `code` is its exit status (never throws for a non-zero exit). */
export interface QemuImgResult {
  code: number;
  stdout: string;
  stderr: string;
}

export const QEMU_IMG = process.env.HYDRAVM_QEMU_IMG ?? 'qemu-img';

/** Run qemu-img with a timeout; a spawn failure (binary missing) rejects. */
export function qemuImg(args: string[], timeoutMs = 60_000): Promise<QemuImgResult> {
  return new Promise((resolve, reject) => {
    execFile(QEMU_IMG, args, { timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024, encoding: 'utf8' }, (err, stdout, stderr) => {
      if (err && typeof (err as NodeJS.ErrnoException).code === 'string') {
        reject(new DiskError('HYDRA_DISK_QEMU_IMG', `cannot run ${QEMU_IMG}: ${err.message}`, { cause: err }));
        return;
      }
      const code = err ? ((err as { code?: number }).code ?? 1) : 0;
      resolve({ code: typeof code === 'number' ? code : 1, stdout, stderr: stderr.trim() });
    });
  });
}

/** One image of `qemu-img info --output=json` (a list of them with --backing-chain). */
export interface ImageInfo {
  filename: string;
  format: string;
  'virtual-size': number;
  'actual-size'?: number;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  'format-specific'?: { type: string; data?: { corrupt?: boolean } };
}

/** fsync a file and its directory, so a layer created by qemu-img survives a host crash. */
export async function fsyncFileAndDir(file: string): Promise<void> {
  const fh = await fs.open(file, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
  const dh = await fs.open(path.dirname(file), 'r');
  try {
    await dh.sync();
  } finally {
    await dh.close();
  }
}

export function isNoSpace(text: string): boolean {
  return /No space left on device|ENOSPC|Disk quota exceeded/i.test(text);
}
