// The Linux watchdog device (/dev/watchdog, e.g. softdog) as an opt-in backstop: fed on lease proof, the kernel resets the host when it starves.
import fs from 'node:fs';
import { HaError } from '../errors.js';
import { monoNow } from '../vm/index.js';

export interface HwWatchdogOptions {
  /** The device, e.g. /dev/watchdog. */
  device: string;
  /** Its timeout in seconds, as configured on the device (softdog: the soft_margin module parameter). */
  timeoutSec: number;
  /** The agent's lease TTL (s): the device must reset the host before the lease could expire. */
  leaseTtlSec: number;
}

/**
 * The per-VM watchdogs live in Node processes: a supervisor that is itself
 * stuck (swapping, stopped, starved of CPU) cannot kill its QEMU. The kernel's
 * watchdog covers that: once opened, the host resets unless it is written to
 * within its timeout. The agent writes to it only when a lease proof is fresh
 * enough that the reset would still come before the lease can expire at etcd:
 * now + timeout <= proof + TTL. A clean stop writes the magic 'V' before
 * closing, which disarms drivers that honour it (not with nowayout=1).
 */
export class HwWatchdog {
  private fd: number | undefined;
  feeds = 0;
  skipped = 0;

  constructor(private readonly opts: HwWatchdogOptions) {
    const ttlMs = opts.leaseTtlSec * 1000;
    // A keepalive goes out every TTL/3: a proof is at most that old when the next one lands.
    if (!(opts.timeoutSec > 0) || opts.timeoutSec * 1000 >= ttlMs - ttlMs / 3) {
      throw new HaError('HYDRA_HA_HW_WATCHDOG', `hardware watchdog ${opts.device}: its timeout (${opts.timeoutSec} s) must be shorter than two thirds of the lease TTL (${opts.leaseTtlSec} s), or a fed device could still be running when the lease expires; raise --lease-ttl`);
    }
  }

  open(): void {
    try {
      this.fd = fs.openSync(this.opts.device, 'w');
    } catch (err) {
      throw new HaError('HYDRA_HA_HW_WATCHDOG', `cannot open hardware watchdog ${this.opts.device}: ${(err as Error).message}`, { cause: err });
    }
  }

  /** A lease proof for a keepalive sent at `sentMono`: feed the device if a reset would still precede the lease's expiry. */
  feed(sentMono: number, ttlMs: number): void {
    if (this.fd === undefined) return;
    if (monoNow() + this.opts.timeoutSec * 1000 > sentMono + ttlMs) {
      this.skipped++;
      return;
    }
    fs.writeSync(this.fd, '\0');
    this.feeds++;
  }

  /** Clean stop: magic close, so the device does not reset the host. */
  close(): void {
    if (this.fd === undefined) return;
    try {
      fs.writeSync(this.fd, 'V');
    } finally {
      fs.closeSync(this.fd);
      this.fd = undefined;
    }
  }
}
