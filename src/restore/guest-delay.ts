// How much of the time a VM's vCPU threads wanted to run but waited for a CPU (from /proc/<pid>/task/*/schedstat): the guest's slowdown by contention.
import fs from 'node:fs';

/** vCPU threads are named "CPU <n>/TCG" or "CPU <n>/KVM" by QEMU. */
const VCPU_COMM = /^CPU \d+\/(TCG|KVM)/;

/**
 * Samples the run-queue wait of a QEMU process's vCPU threads. Each sample()
 * returns the share of wall time since the previous sample that the vCPUs
 * spent runnable but not running (0..1, averaged over vCPUs), or null before
 * there are two samples or when the threads cannot be read (QEMU gone).
 */
export class GuestDelay {
  private tids: number[] | null = null;
  private last: { t: number; wait: number } | null = null;

  constructor(private readonly pid: number) {}

  private vcpus(): number[] {
    if (this.tids) return this.tids;
    const out: number[] = [];
    for (const t of fs.readdirSync(`/proc/${this.pid}/task`)) {
      try {
        if (VCPU_COMM.test(fs.readFileSync(`/proc/${this.pid}/task/${t}/comm`, 'utf8'))) out.push(Number(t));
      } catch {
        /* thread gone meanwhile */
      }
    }
    if (out.length) this.tids = out;
    return out;
  }

  sample(): number | null {
    let wait = 0;
    let n = 0;
    try {
      for (const tid of this.vcpus()) {
        // schedstat: ns on CPU, ns waiting on a run queue, timeslices.
        const f = fs.readFileSync(`/proc/${this.pid}/task/${tid}/schedstat`, 'utf8').split(' ');
        wait += Number(f[1]);
        n++;
      }
    } catch {
      return null;
    }
    if (n === 0) return null;
    const t = performance.now();
    const prev = this.last;
    this.last = { t, wait };
    if (!prev || t <= prev.t) return null;
    return Math.max(0, (wait - prev.wait) / 1e6 / (t - prev.t) / n);
  }
}
