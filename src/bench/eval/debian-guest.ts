// Driving a workload VM of the Debian workload image: its spec, and the timestamped `hydra-workload:` lines its runner prints on the serial console.
import fs from 'node:fs';
import path from 'node:path';
import { validateSpec, type VmSpec, vmPaths } from '../../vm/index.js';
import { DEBIAN_CMDLINE, type BuiltImage } from '../../image/index.js';
import { BenchError } from '../../errors.js';
import { sleep } from '../../util/sleep.js';
import type { DebianWorkload } from './workloads.js';

/**
 * The workload VM: a fresh overlay on the image's root disk (in `dir`), no
 * NIC (the jobs need none), the job chosen on the kernel command line.
 * Absolute paths into the build, so a later build under the same name
 * cannot change what a run boots.
 */
export function debianSpec(name: string, img: BuiltImage, w: DebianWorkload, scale: number, dir: string): VmSpec {
  const root = path.join(dir, `${name}-root.qcow2`);
  fs.rmSync(root, { force: true });
  return validateSpec({
    name, memory: `${w.memoryMb}M`, vcpus: 1, accel: 'auto',
    kernel: img.vmlinux ?? img.kernel, initrd: img.initrd,
    cmdline: `${DEBIAN_CMDLINE} quiet hydra.workload=${w.id} hydra.scale=${scale}`,
    root: { path: root, base: img.root },
  }, dir, `bench eval spec for ${name}`);
}

export interface WorkloadLine {
  /** performance.now() when the harness saw the line (polled every 20 ms). */
  t: number;
  kind: 'start' | 'step' | 'done';
  step?: number;
  of?: number;
  seconds?: number;
  status?: number;
}

/** Follows a VM's serial log and timestamps each `hydra-workload:` line as it appears. */
export class WorkloadWatch {
  readonly lines: WorkloadLine[] = [];
  private pos = 0;
  private partial = '';
  private error: string | undefined;
  private readonly timer: NodeJS.Timeout;

  constructor(private readonly vm: string) {
    fs.rmSync(vmPaths(vm).serialLog, { force: true });
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
      if (/hydra-workload: start name=/.test(line)) this.lines.push({ t, kind: 'start' });
      else if ((m = /hydra-workload: name=\S+ step=(\d+) of=(\d+)/.exec(line))) this.lines.push({ t, kind: 'step', step: Number(m[1]), of: Number(m[2]) });
      else if ((m = /hydra-workload: done name=\S+ seconds=([\d.]+) status=(\d+)/.exec(line))) this.lines.push({ t, kind: 'done', seconds: Number(m[1]), status: Number(m[2]) });
      else if ((m = /hydra-workload: error .*/.exec(line))) this.error ??= m[0];
    }
  }

  /** Fraction of the job done by the last step line seen at or before `t` (0 before any). */
  fractionAt(t: number): number {
    const l = [...this.lines].reverse().find((x) => x.kind === 'step' && x.t <= t);
    return l && l.of ? l.step! / l.of : 0;
  }

  /** When the first step line at or beyond `fraction` of the job was seen. */
  timeOf(fraction: number): number | undefined {
    return this.lines.find((l) => l.kind === 'step' && l.of! > 0 && l.step! / l.of! >= fraction)?.t;
  }

  async until(what: string, pred: (w: WorkloadWatch) => WorkloadLine | undefined | false, timeoutMs: number): Promise<WorkloadLine> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      this.poll();
      const l = pred(this);
      if (l) {
        if (l.kind === 'done' && l.status !== 0) throw new BenchError('HYDRA_BENCH_NO_PROGRESS', `VM ${this.vm}: the workload failed (exit status ${l.status}; see ${vmPaths(this.vm).serialLog})`);
        return l;
      }
      if (this.error) throw new BenchError('HYDRA_BENCH_NO_PROGRESS', `VM ${this.vm}: the workload runner refused: ${this.error}`);
      if (performance.now() > deadline) throw new BenchError('HYDRA_BENCH_TIMEOUT', `VM ${this.vm}: timed out after ${Math.round(timeoutMs / 1000)} s waiting for ${what} (see ${vmPaths(this.vm).serialLog})`);
      await sleep(50);
    }
  }

  started = (timeoutMs: number) => this.until('the workload to start', (w) => w.lines.find((l) => l.kind === 'start'), timeoutMs);
  finished = (timeoutMs: number, after = 0) => this.until('the workload to finish', (w) => w.lines.find((l) => l.kind === 'done' && l.t > after), timeoutMs);
  reached = (fraction: number, timeoutMs: number) => this.until(`${Math.round(fraction * 100)} % of the workload`, (w) => w.lines.find((l) => l.kind === 'step' && l.of! > 0 && l.step! / l.of! >= fraction), timeoutMs);

  close(): void {
    clearInterval(this.timer);
  }
}
