// A read-only view of shared guest RAM of any size, as mappings of at most 1 GiB each (a Node Buffer holds at most 4 GiB).
import type { RawAddon } from '../native/index.js';

/** Size of one mapping of the view; guest RAM is a whole number of pages, so chunks split runs only at page boundaries. */
export const RAM_CHUNK_BYTES = 1024 * 1024 * 1024;

/**
 * Guest RAM mapped read-only from its file (memfd or hugetlbfs) in chunks.
 * copyRuns() copies [offset, length] runs of RAM, in order and contiguously,
 * into a destination buffer, splitting a run that crosses a chunk boundary;
 * consecutive runs in one chunk go to the addon in one call (its copy
 * threads work inside a call).
 */
export class RamView {
  private constructor(private readonly native: RawAddon, readonly chunks: Buffer[], readonly size: number, private readonly chunkBytes: number) {}

  /** chunkBytes: a multiple of the page size (smaller only in tests). */
  static map(native: RawAddon, fd: number, fileOffset: number, size: number, chunkBytes = RAM_CHUNK_BYTES): RamView {
    const chunks: Buffer[] = [];
    try {
      for (let off = 0; off < size; off += chunkBytes) chunks.push(native.mmapFile(fd, Math.min(chunkBytes, size - off), fileOffset + off, false));
    } catch (err) {
      for (const c of chunks) native.releaseMapping(c);
      throw err;
    }
    return new RamView(native, chunks, size, chunkBytes);
  }

  /** The whole of RAM as one Buffer, when it fits one (tests compare images with it); undefined otherwise. */
  whole(): Buffer | undefined {
    return this.chunks.length === 1 ? this.chunks[0] : undefined;
  }

  copyRuns(runs: Float64Array, dst: Buffer, dstOffset = 0, maxThreads?: number): number {
    if (this.chunks.length === 1) return this.native.copyRuns(this.chunks[0]!, runs, dst, dstOffset, maxThreads);
    let pos = dstOffset;
    let batch: number[] = [];
    let batchChunk = -1;
    const flush = () => {
      if (batch.length === 0) return;
      pos += this.native.copyRuns(this.chunks[batchChunk]!, Float64Array.from(batch), dst, pos, maxThreads);
      batch = [];
    };
    for (let i = 0; i + 1 < runs.length; i += 2) {
      let off = runs[i]!;
      let left = runs[i + 1]!;
      // The addon checks every run against its chunk: a run outside RAM fails there, as with one mapping.
      if (off < 0 || off + left > this.size) return this.native.copyRuns(this.chunks[0]!, runs.subarray(i, i + 2), dst, pos, maxThreads);
      while (left > 0) {
        const chunk = Math.floor(off / this.chunkBytes);
        const inChunk = off - chunk * this.chunkBytes;
        const take = Math.min(left, this.chunkBytes - inChunk);
        if (chunk !== batchChunk) {
          flush();
          batchChunk = chunk;
        }
        batch.push(inChunk, take);
        off += take;
        left -= take;
      }
    }
    flush();
    return pos - dstOffset;
  }

  release(): void {
    for (const c of this.chunks) {
      try { this.native.releaseMapping(c); } catch { /* finalizer unmaps later */ }
    }
  }
}
