// Driving a Debian workload VM: its spec, and the timestamped `hydra-workload:` lines its runner prints on the serial console.
import fs from 'node:fs';
import { validateSpec, type VmSpec, vmPaths } from '../../vm/index.js';
import { BenchError } from '../../errors.js';
import { sleep } from '../../util/sleep.js';
import type { DebianWorkload } from './workloads.js';

/**
 * The workload VM: the Debian image as its root disk, no NIC (the workload
 * needs none), the workload chosen on the kernel command line. The script
 * travels base64-encoded so the image's runner needs no copy of it.
 */
export function debianSpec(name: string, w: DebianWorkload): VmSpec {
  const script = Buffer.from(w.script).toString('base64');
  return validateSpec({
    name, memory: `${w.memoryMb}M`, vcpus: 1, accel: 'auto', root: 'debian', nics: [],
    cmdline: `console=ttyS0 hydra.workload=${w.id} hydra.script=${script}`,
  }, process.cwd(), `bench eval spec for ${name}`);
}

export interface WorkloadLine {
  t: number;
  kind: 'start' | 'progress' | 'done';
  done?: number;
  total?: number;
  seconds?: number;
  status?: number;
}

/** Follows a VM's serial log and timestamps each `hydra-workload:` line as it appears (polled every 20 ms). */
export class WorkloadWatch {
  readonly lines: WorkloadLine[] = [];
  private pos = 0;
  private partial = '';
  private readonly timer: NodeJS.Timeout;

  constructor(private readonly vm: string) {
    this.timer = setInterval(() => this.poll(), 20);
  }

  poll(): void {
    let text: Buffer;
    try {
      text = fs.readFileSync(vmPaths(this.vm).serialLog);
    } catch {
      // No serial log yet: the VM is still starting.
      return;
    }
    if (text.length <= this.pos) return;
    const t = performance.now();
    const chunk = this.partial + text.subarray(this.pos).toString('latin1');
    this.pos = text.length;
    const parts = chunk.split('\n');
    this.partial = parts.pop() ?? '';
    for (const line of parts) {
      let m: RegExpExecArray | null;
      if (/hydra-workload: start/.test(line)) this.lines.push({ t, kind: 'start' });
      else if ((m = /hydra-workload: progress=(\d+)\/(\d+)/.exec(line))) this.lines.push({ t, kind: 'progress', done: Number(m[1]), total: Number(m[2]) });
      else if ((m = /hydra-workload: done .*seconds=([\d.]+) status=(\d+)/.exec(line))) this.lines.push({ t, kind: 'done', seconds: Number(m[1]), status: Number(m[2]) });
    }
  }

  /** Fraction done by the last progress line (0 before any). */
  fraction(): number {
    const p = [...this.lines].reverse().find((l) => l.kind === 'progress');
    return p && p.total ? p.done! / p.total : 0;
  }

  async until(what: string, pred: (w: WorkloadWatch) => WorkloadLine | undefined | false, timeoutMs: number): Promise<WorkloadLine> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      this.poll();
      const l = pred(this);
      if (l) return l;
      if (performance.now() > deadline) throw new BenchError('HYDRA_BENCH_TIMEOUT', `VM ${this.vm}: timed out after ${Math.round(timeoutMs / 1000)} s waiting for ${what} (see ${vmPaths(this.vm).serialLog})`);
      await sleep(50);
    }
  }

  started = (timeoutMs: number) => this.until('the workload to start', (w) => w.lines.find((l) => l.kind === 'start'), timeoutMs);
  finished = (timeoutMs: number) => this.until('the workload to finish', (w) => w.lines.find((l) => l.kind === 'done'), timeoutMs);
  reached = (fraction: number, timeoutMs: number) => this.until(`${Math.round(fraction * 100)} % of the workload`, (w) => w.lines.find((l) => l.kind === 'progress' && l.total! > 0 && l.done! / l.total! >= fraction), timeoutMs);

  close(): void {
    clearInterval(this.timer);
  }
}
