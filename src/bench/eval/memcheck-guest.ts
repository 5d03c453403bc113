// The memcheck test guest as an evaluation workload: boot it over (nearly) all its RAM, read its progress, kill and slim-restore it.
import fs from 'node:fs';
import { validateSpec, type VmSpec, startVm, stopVm, vmPaths, readState, isLive, readSerial } from '../../vm/index.js';
import { restoreVm, type RestoreResult } from '../../restore/index.js';
import { BenchError } from '../../errors.js';
import { sleep, within } from '../../util/sleep.js';
import { waitFor } from '../harness.js';

/**
 * memcheck's working set for a fully populated guest of `memoryMb`: all RAM
 * but what the kernel, the initramfs and memcheck's own index need. The
 * kernel's share grows with RAM (page structs, zone watermarks): a 4 GB guest
 * runs out of memory at 96 % - 112 MB, so 8 % is left. memcheck writes every
 * page of its working set before its first progress line.
 */
export function fullWorkingSetMb(memoryMb: number): number {
  return Math.max(16, Math.floor(memoryMb * 0.92) - 112);
}

export interface MemcheckGuestOptions {
  name: string;
  memoryMb: number;
  workingSetMb: number;
  /** Write rate in MB/s; 0 = unthrottled. */
  rateMb: number;
}

export function memcheckSpec(o: MemcheckGuestOptions): VmSpec {
  // No periodic full verification: over GBs it would stall the guest for seconds and blur every timing.
  return validateSpec({
    name: o.name, memory: `${o.memoryMb}M`, vcpus: 1, accel: 'auto', kernel: 'guest:vmlinux', initrd: 'guest:initrd.img',
    cmdline: `console=ttyS0 quiet hydra.run=memcheck memcheck.mb=${o.workingSetMb} memcheck.rate=${o.rateMb} memcheck.args="--full-every-s 0"`,
  }, process.cwd(), `bench eval spec for ${o.name}`);
}

const stepLine = /memcheck: step=(\d+)\b/g;

/** The last memcheck step printed after `fromOffset`, with the serial log's size. */
export function lastStep(name: string, fromOffset = 0): { step: number | null; offset: number } {
  const text = readSerial(vmPaths(name).serialLog);
  let step: number | null = null;
  for (const m of text.slice(fromOffset).matchAll(stepLine)) step = Number(m[1]);
  return { step, offset: Buffer.byteLength(text, 'latin1') };
}

/** Boot a memcheck guest; resolves once memcheck has filled its working set and printed its first step. */
export async function bootMemcheck(o: MemcheckGuestOptions): Promise<{ spec: VmSpec; bootMs: number }> {
  const spec = memcheckSpec(o);
  fs.rmSync(vmPaths(o.name).serialLog, { force: true });
  const t0 = performance.now();
  await startVm(spec);
  // Filling RAM runs at a few hundred MB/s under TCG, slower on a loaded host.
  const deadline = t0 + 120_000 + o.workingSetMb * 120;
  for (;;) {
    const s = lastStep(o.name);
    if (s.step !== null) return { spec, bootMs: performance.now() - t0 };
    const text = readSerial(vmPaths(o.name).serialLog);
    if (/MEMCHECK ERROR/.test(text)) throw new BenchError('HYDRA_BENCH_NO_PROGRESS', `VM ${o.name}: memcheck failed to start: ${/MEMCHECK ERROR[^\n]*/.exec(text)![0]}`);
    const oom = /Out of memory: Killed process \d+ \(memcheck\)[^\n]*/.exec(text);
    if (oom) throw new BenchError('HYDRA_BENCH_NO_PROGRESS', `VM ${o.name}: the guest kernel killed memcheck (${o.workingSetMb} MB of ${o.memoryMb} MB): ${oom[0].trim()}`);
    if (!isLive(readState(o.name))) throw new BenchError('HYDRA_BENCH_NO_PROGRESS', `VM ${o.name} exited before memcheck started (see ${vmPaths(o.name).qemuLog})`);
    if (performance.now() > deadline) throw new BenchError('HYDRA_BENCH_NO_PROGRESS', `VM ${o.name}: no memcheck progress within ${Math.round((deadline - t0) / 1000)} s of its start (see ${vmPaths(o.name).serialLog})`);
    await sleep(250);
  }
}

/** memcheck steps per second over the next `seconds` (from the progress lines memcheck prints up to 4 times a second). */
export async function stepsPerSecond(name: string, seconds: number): Promise<number | null> {
  const a = lastStep(name);
  const ta = performance.now();
  await sleep(seconds * 1000);
  const b = lastStep(name);
  const tb = performance.now();
  if (a.step === null || b.step === null) return null;
  return (b.step - a.step) / ((tb - ta) / 1000);
}

export interface FailAndRestore {
  restore: RestoreResult;
  killToRunningMs: number;
  /** From the restored guest running to its memory complete (network mode with prefetch); null if not within the wait. */
  completeAfterRunningMs: number | null;
}

/** SIGKILL the VM's QEMU, wait for its supervisor to go, slim-restore it in network mode and wait for memory to be complete. */
export async function killAndRestore(name: string, store: string, storeDir: string, completeTimeoutMs: number): Promise<FailAndRestore> {
  const state = readState(name);
  if (!state?.qemuPid) throw new BenchError('HYDRA_BENCH_NO_PROGRESS', `VM ${name} has no QEMU to kill`);
  const tKill = performance.now();
  process.kill(state.qemuPid, 'SIGKILL');
  await waitFor(`VM ${name}'s supervisor to record the crash and exit`, () => !isLive(readState(name)), 20_000);
  const tCall = performance.now();
  const restore = await restoreVm({ vm: name, store, secret: process.env.HYDRAVM_SECRET!, mode: 'network', storeDir, prefetch: true });
  const tRun = tCall + restore.timings.totalMs;
  let completeAfterRunningMs: number | null = null;
  if (restore.pager) {
    const done = (await within(restore.pager.done.then(() => true, () => false), completeTimeoutMs)) ?? false;
    if (done && restore.pager.stats.completeMs !== null) completeAfterRunningMs = performance.now() - tRun;
  }
  return { restore, killToRunningMs: tRun - tKill, completeAfterRunningMs };
}

/** Stop a VM the evaluation started; a VM already gone is what we want. */
export async function stopQuietly(name: string, restore?: RestoreResult): Promise<void> {
  // The pager may still serve memory: stop it first, then the VM; a pager or VM already gone is fine.
  if (restore?.pager) await restore.pager.stop().catch(() => undefined);
  await stopVm(name).catch(() => undefined);
}
