// Guest pages read straight from the committed image file (file mode into a restore shell).
import fs from 'node:fs/promises';
import { RestoreError } from '../errors.js';
import type { PageSource } from './network-pager.js';

/**
 * A restore shell's RAM is a memfd registered for missing pages, so a file-mode
 * restore into it fills pages by reading the image file (a shared filesystem)
 * instead of mapping it privately. The image of a fenced generation never
 * changes, as for the private mapping.
 */
export class FilePageSource implements PageSource {
  private constructor(private readonly fh: fs.FileHandle, private readonly file: string) {}

  static async open(file: string): Promise<FilePageSource> {
    try {
      return new FilePageSource(await fs.open(file, 'r'), file);
    } catch (err) {
      throw new RestoreError('HYDRA_RESTORE_FAILED', `cannot open image ${file} for file-mode paging: ${(err as Error).message}`, { cause: err });
    }
  }

  async readPages(runs: { offset: number; length: number }[]): Promise<Buffer> {
    let total = 0;
    for (const r of runs) total += r.length;
    const out = Buffer.allocUnsafe(total);
    let pos = 0;
    for (const r of runs) {
      let done = 0;
      while (done < r.length) {
        const { bytesRead } = await this.fh.read(out, pos + done, r.length - done, r.offset + done);
        if (bytesRead === 0) throw new RestoreError('HYDRA_RESTORE_PAGE_FETCH', `image ${this.file} ends before offset ${r.offset + done}`);
        done += bytesRead;
      }
      pos += r.length;
    }
    return out;
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}
