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
export function debianSpec(name: string, img: BuiltImage, w: DebianWorkload, scale: number, dir: string, runs = 1): VmSpec {
  const root = path.join(dir, `${name}-root.qcow2`);
  fs.rmSync(root, { force: true });
  return validateSpec({
    name, memory: `${w.memoryMb}M`, vcpus: 1, accel: 'auto',
    kernel: img.vmlinux ?? img.kernel, initrd: img.initrd,
    cmdline: `${DEBIAN_CMDLINE} quiet hydra.workload=${w.id} hydra.scale=${scale}${runs > 1 ? ` hydra.runs=${runs}` : ''}`,
    root: { path: root, base: img.root },
  }, dir, `bench eval spec for ${name}`);
}

export interface WorkloadLine {
  /** performance.now() when the harness saw the line (polled every 20 ms). */
  t: number;
  kind: 'ready' | 'start' | 'step' | 'done';
  /** The run of the job in this boot (1 without hydra.runs); step lines belong to the last start. */
  run: number;
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
  private run = 1;
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
      // systemd may echo a line twice on the console (its own copy and the kernel's): keep the first.
      if ((m = /hydra-workload: ready name=\S+ run=(\d+)/.exec(line))) this.push({ t, kind: 'ready', run: Number(m[1]) });
      else if ((m = /hydra-workload: start name=\S+ run=(\d+)/.exec(line))) this.push({ t, kind: 'start', run: (this.run = Number(m[1])) });
      else if ((m = /hydra-workload: name=\S+ step=(\d+) of=(\d+)/.exec(line))) this.push({ t, kind: 'step', run: this.run, step: Number(m[1]), of: Number(m[2]) });
      else if ((m = /hydra-workload: done name=\S+ run=(\d+) seconds=([\d.]+) status=(\d+)/.exec(line))) this.push({ t, kind: 'done', run: Number(m[1]), seconds: Number(m[2]), status: Number(m[3]) });
      else if ((m = /hydra-workload: error .*/.exec(line))) this.error ??= m[0];
    }
  }

  private push(l: WorkloadLine): void {
    if (!this.lines.some((x) => x.kind === l.kind && x.run === l.run && x.step === l.step)) this.lines.push(l);
  }

  /** Fraction of run `run` done by the last step line seen at or before `t` (0 before any). */
  fractionAt(t: number, run = 1): number {
    const l = [...this.lines].reverse().find((x) => x.kind === 'step' && x.run === run && x.t <= t);
    return l && l.of ? l.step! / l.of : 0;
  }

  /** When the first step line of run `run` at or beyond `fraction` of the job was seen. */
  timeOf(fraction: number, run = 1): number | undefined {
    return this.lines.find((l) => l.kind === 'step' && l.run === run && l.of! > 0 && l.step! / l.of! >= fraction)?.t;
  }

  /** [seconds since the start line, fraction done] at each step line of run `run`. */
  timeline(run: number, startT: number): [number, number][] {
    return this.lines.filter((l) => l.kind === 'step' && l.run === run).map((l) => [(l.t - startT) / 1000, l.step! / l.of!]);
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

  ready = (run: number, timeoutMs: number) => this.until(`the workload runner to be ready for run ${run}`, (w) => w.lines.find((l) => l.kind === 'ready' && l.run === run), timeoutMs);
  started = (timeoutMs: number, run = 1) => this.until(`run ${run} of the workload to start`, (w) => w.lines.find((l) => l.kind === 'start' && l.run === run), timeoutMs);
  finished = (timeoutMs: number, run = 1, after = 0) => this.until(`run ${run} of the workload to finish`, (w) => w.lines.find((l) => l.kind === 'done' && l.run === run && l.t > after), timeoutMs);
  reached = (fraction: number, timeoutMs: number, run = 1) => this.until(`${Math.round(fraction * 100)} % of run ${run} of the workload`, (w) => w.lines.find((l) => l.kind === 'step' && l.run === run && l.of! > 0 && l.step! / l.of! >= fraction), timeoutMs);

  close(): void {
    clearInterval(this.timer);
  }
}
