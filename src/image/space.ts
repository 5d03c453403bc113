// Free-space check before a build fills the disk.
import fs from 'node:fs';
import { ImageError } from '../errors.js';

const GiB = 1024 ** 3;

/**
 * Throw HYDRA_IMAGE_NO_SPACE unless `dir`'s filesystem has `needBytes` free.
 * `freeBytes` can be given to check a number instead of the filesystem (tests of the message).
 */
export function assertFreeSpace(dir: string, needBytes: number, what: string, freeBytes?: number): void {
  let free = freeBytes;
  if (free === undefined) {
    const st = fs.statfsSync(dir);
    free = st.bavail * st.bsize;
  }
  if (free < needBytes) {
    throw new ImageError('HYDRA_IMAGE_NO_SPACE', `${what}: needs about ${(needBytes / GiB).toFixed(1)} GiB free in ${dir}, only ${(free / GiB).toFixed(1)} GiB are (free some space, or set HYDRAVM_CACHE to a larger filesystem)`);
  }
}

/**
 * What a Debian build needs at its peak: the unpacked tree, the ext4 image
 * made from it (sparse: only the data) and the qcow2 converted from that, each
 * about the size of the installed packages. Measured: ~0.7 GiB installed for
 * the default set; compilers and ffmpeg add ~0.6 GiB.
 */
export function debianBuildNeeds(packages: string[]): number {
  const heavy = packages.filter((p) => /^(gcc|g\+\+|build-essential|ffmpeg|clang|llvm)/.test(p)).length;
  const installed = 0.9 * GiB + heavy * 0.4 * GiB;
  return Math.ceil(3 * installed + 0.5 * GiB);
}
