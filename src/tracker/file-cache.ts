// The page cache of an image file: read runs of it in (a file-mode restore's warming), or drop it (tests, benchmarks).
import { loadNative } from '../native/index.js';
import { populatedRunsOf, type DirtyRun } from './dirty-tracker.js';

/** Each run of the open file `fd` into the page cache (readahead, then read, in the threadpool); resolves with the bytes cached. */
export function warmFileRuns(fd: number, runs: readonly DirtyRun[]): Promise<number> {
  const flat = new Float64Array(runs.length * 2);
  runs.forEach((r, i) => { flat[2 * i] = r.offset; flat[2 * i + 1] = r.length; });
  return loadNative().warmFileRuns(fd, flat);
}

/** The file's clean pages leave this host's page cache (POSIX_FADV_DONTNEED). */
export function dropFileCache(fd: number): void {
  loadNative().dropFileCache(fd);
}

/** The data runs of the open file `fd` within [0, size) (SEEK_DATA / SEEK_HOLE); holes read as zeros. */
export function fileDataRunsOf(fd: number, size: number): DirtyRun[] {
  return populatedRunsOf(loadNative(), fd, 0, size);
}
