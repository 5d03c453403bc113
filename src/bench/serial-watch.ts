// Timestamps a VM's memcheck progress lines as they appear on its serial console: the benchmarks' measure of guest progress.
import fs from 'node:fs';
import { startVm, vmPaths, type VmSpec } from '../vm/index.js';
import { BenchError } from '../errors.js';
import { sleep } from './harness.js';

const now = () => performance.now();

interface ProgressLine {
  /** performance.now() when the bench saw the line (polled every 10 ms). */
  t: number;
  step: number;
  /** Byte offset of the line's start in the serial log. */
  offset: number;
}

/** Follows a serial log and timestamps every memcheck progress line as it appears. */
export class SerialWatch {
  readonly lines: ProgressLine[] = [];
  private pos = 0;
  private partial = '';
  private partialStart = 0;
  private readonly timer: NodeJS.Timeout;

  constructor(private readonly file: string) {
    this.timer = setInterval(() => this.poll(), 10);
  }

  /** Bytes read so far: a line starting at or after this offset is new. */
  get offset(): number {
    this.poll();
    return this.pos;
  }

  poll(): void {
    let fd: number;
    try {
      fd = fs.openSync(this.file, 'r');
    } catch {
      return;
    }
    try {
      const size = fs.fstatSync(fd).size;
      if (size <= this.pos) return;
      const buf = Buffer.alloc(size - this.pos);
      const n = fs.readSync(fd, buf, 0, buf.length, this.pos);
      const t = now();
      let text = this.partial + buf.subarray(0, n).toString('latin1');
      let lineStart = this.partial ? this.partialStart : this.pos;
      this.pos += n;
      for (;;) {
        const nl = text.indexOf('\n');
        if (nl < 0) break;
        const line = text.slice(0, nl);
        const m = /memcheck: step=(\d+)\b/.exec(line);
        if (m) this.lines.push({ t, step: Number(m[1]), offset: lineStart });
        lineStart += nl + 1;
        text = text.slice(nl + 1);
      }
      this.partial = text;
      this.partialStart = lineStart;
    } finally {
      fs.closeSync(fd);
    }
  }

  firstAfter(offset: number): ProgressLine | undefined {
    return this.lines.find((l) => l.offset >= offset);
  }

  async waitFirstAfter(offset: number, timeoutMs: number): Promise<ProgressLine | undefined> {
    const deadline = now() + timeoutMs;
    for (;;) {
      this.poll();
      const l = this.firstAfter(offset);
      if (l || now() > deadline) return l;
      await sleep(5);
    }
  }

  /**
   * memcheck steps per second over [from, to): steps since the first line
   * seen in the window, divided by the time from the window's start to the
   * last line in it, so a stall at the start of the window counts against it.
   */
  rate(from: number, to: number, minOffset = 0): number | null {
    const w = this.lines.filter((l) => l.t >= from && l.t < to && l.offset >= minOffset);
    if (w.length < 2) return null;
    const first = w[0]!;
    const last = w[w.length - 1]!;
    return (last.step - first.step) / ((last.t - from) / 1000);
  }

  close(): void {
    clearInterval(this.timer);
  }
}


/** Boot a fresh VM; resolves at its first memcheck progress line. */
export async function boot(spec: VmSpec): Promise<{ watch: SerialWatch; bootMs: number }> {
  fs.rmSync(vmPaths(spec.name).serialLog, { force: true });
  const watch = new SerialWatch(vmPaths(spec.name).serialLog);
  const t0 = now();
  await startVm(spec);
  const first = await watch.waitFirstAfter(0, 90_000);
  if (!first) {
    watch.close();
    throw new BenchError('HYDRA_BENCH_NO_PROGRESS', `VM ${spec.name}: no memcheck progress within 90 s of its start (see ${vmPaths(spec.name).serialLog})`);
  }
  return { watch, bootMs: first.t - t0 };
}

