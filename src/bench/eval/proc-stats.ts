// Memory and CPU of a process from /proc: what the store and the checkpointer cost while a VM is protected.
import fs from 'node:fs';
import os from 'node:os';

export interface ProcMemory {
  /** Resident set, and its anonymous part (reserved memory; file pages are reclaimable cache). */
  rssMb: number;
  rssAnonMb: number;
}

export function procMemory(pid: number | undefined | null): ProcMemory | null {
  if (!pid) return null;
  try {
    const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? NaN);
    return { rssMb: kb('VmRSS') / 1024, rssAnonMb: kb('RssAnon') / 1024 };
  } catch {
    // The process is gone: no sample rather than a wrong one.
    return null;
  }
}

const CLK_TCK = 100;

/** User + system CPU seconds the process has used so far. */
export function procCpuSeconds(pid: number | undefined | null): number | null {
  if (!pid) return null;
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name may contain spaces: fields start after the last ')'.
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / CLK_TCK;
  } catch {
    // The process is gone: no sample.
    return null;
  }
}

/** Samples a process's RSS and CPU share over a window (CPU in % of one core). */
export class ProcSampler {
  private readonly rss: number[] = [];
  private readonly anon: number[] = [];
  private readonly cpu0: number | null;
  private readonly t0 = performance.now();
  private readonly timer: NodeJS.Timeout;

  constructor(private readonly pid: number | undefined, everyMs = 500) {
    this.cpu0 = procCpuSeconds(pid);
    this.sample();
    this.timer = setInterval(() => this.sample(), everyMs);
  }

  private sample(): void {
    const m = procMemory(this.pid);
    if (m) {
      this.rss.push(m.rssMb);
      this.anon.push(m.rssAnonMb);
    }
  }

  stop(): { rssMbMax: number | null; rssAnonMbMax: number | null; cpuPct: number | null; seconds: number } {
    clearInterval(this.timer);
    this.sample();
    const seconds = (performance.now() - this.t0) / 1000;
    const cpu1 = procCpuSeconds(this.pid);
    return {
      rssMbMax: this.rss.length ? Math.max(...this.rss) : null,
      rssAnonMbMax: this.anon.length ? Math.max(...this.anon) : null,
      cpuPct: this.cpu0 !== null && cpu1 !== null && seconds > 0 ? ((cpu1 - this.cpu0) / seconds) * 100 : null,
      seconds,
    };
  }
}

export const hostCores = () => os.cpus().length;
