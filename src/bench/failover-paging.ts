// `hydravm bench failover --paging-only`: network-mode paging bandwidth against the store's own read bandwidth, time to memory complete, and the guest's slowdown meanwhile.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { validateSpec, stopVm, vmPaths, readState, isLive, countViolations, parseSize, type VmSpec } from '../vm/index.js';
import { protectVm, unprotectVm, readProtection } from '../checkpoint/index.js';
import { restoreVm } from '../restore/index.js';
import { StoreClient, MAX_PAGES_DATA } from '../protocol/index.js';
import { BenchError } from '../errors.js';
import { fmt, sleep, waitFor, type BenchEnv } from './harness.js';
import { within } from '../util/sleep.js';
import { boot } from './serial-watch.js';

export interface PagingBenchOptions {
  /** Guest memory sizes, e.g. ['512M', '2G']. */
  sizes: string[];
  /** Stream controls to try: 'guard' (the default rate control, 5 % vCPU wait), 'none' (unlimited), or a fixed limit in MB/s. */
  modes: string[];
  /** Background connections of the pager. */
  streams: number;
  workingSetMb: number;
  intervalMs: number;
  /** Seconds of memcheck progress measured for the unfailed baseline and after memory is complete. */
  windowS: number;
  log: (msg: string) => void;
}

export interface StoreReadBandwidth {
  imageBytes: number;
  /** Bytes of the image file actually allocated on disk (the rest are holes, read as zeros without I/O). */
  allocatedBytes: number;
  /** Sequential 8 MiB preads of the image by the store host after evicting it from the page cache (posix_fadvise DONTNEED). */
  rawColdMBs: number;
  /** The same from the page cache. */
  rawWarmMBs: number;
  /** Whole image through READ_PAGES (8 MiB requests, `streams` connections x 2 deep), no guest: the store and protocol alone. */
  readPagesMBs: number;
}

export interface PagingRun {
  memory: string;
  memoryBytes: number;
  /** Stream control: 'guard', 'none' or a fixed limit in MB/s. */
  control: string;
  /** Lowest rate the guard set, MB/s (null: never engaged). */
  guardMinMBs: number | null;
  streams: number;
  killToRunningMs: number;
  /** From the guest running again until every page is present. */
  completeAfterRunningMs: number | null;
  /** The background stream's start until every page is present. */
  streamMs: number | null;
  /** Bytes fetched / stream time. */
  pagingMBs: number | null;
  /** CPU ms per MiB paged in, restoring process (pager) and store process, user + system: the cost that does not depend on the load. */
  cpuMsPerMiB: { pager: number | null; store: number | null };
  faults: number;
  reconnects: number;
  /** memcheck steps/s of the same VM unprotected and never failed. */
  baselineStepsPerS: number | null;
  /** While memory was paged in (running until complete). */
  pagingStepsPerS: number | null;
  /** After memory was complete (same window length as the baseline). */
  afterStepsPerS: number | null;
  /** 1 - paging / baseline, percent (negative: faster). */
  slowdownPct: number | null;
  violations: number;
  store: StoreReadBandwidth;
}

const MB = 1e6;
const MiB = 1024 * 1024;
const now = () => performance.now();

function makeSpec(name: string, memory: string, opts: PagingBenchOptions): VmSpec {
  // memcheck unthrottled: its steps/s is then the CPU the guest gets, which is what paging may take away.
  return validateSpec({
    name, memory, vcpus: 1, accel: 'auto', kernel: 'guest:vmlinux', initrd: 'guest:initrd.img',
    cmdline: `console=ttyS0 quiet hydra.run=memcheck memcheck.mb=${opts.workingSetMb} memcheck.rate=0`,
  }, process.cwd(), 'bench spec');
}


/** memcheck steps/s of a freshly booted, unprotected VM that never fails. */
async function baselineRate(memory: string, opts: PagingBenchOptions): Promise<number | null> {
  const spec = makeSpec(`pg-base-${memory.toLowerCase()}`, memory, opts);
  opts.log(`[${spec.name}] boot (unprotected, unfailed baseline)`);
  const { watch } = await boot(spec);
  try {
    await sleep(3000);
    const t = now();
    await sleep(opts.windowS * 1000);
    return watch.rate(t, now());
  } finally {
    watch.close();
    // Cleanup after the measurement: a VM already gone is what we want.
    await stopVm(spec.name).catch(() => undefined);
  }
}

/** CPU time (user + system, ms) of this process. */
function selfCpuMs(): number {
  const c = process.cpuUsage();
  return (c.user + c.system) / 1000;
}

/** CPU time (user + system, ms) another process has used so far (null: unreadable), from /proc/<pid>/stat in USER_HZ = 100 ticks. */
function processCpuMs(pid: number): number | null {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) * 10;
  } catch {
    return null;
  }
}

/** The image file of the VM's newest generation in the store directory (the largest memory*.img). */
function imageFile(storeDir: string, vm: string): string {
  const vmDir = path.join(storeDir, 'vms', vm);
  const gens = fs.readdirSync(vmDir).filter((d) => /^gen-\d+$/.test(d)).sort((a, b) => Number(b.slice(4)) - Number(a.slice(4)));
  for (const g of gens) {
    const imgs = fs.readdirSync(path.join(vmDir, g)).filter((f) => /^memory.*\.img$/.test(f));
    if (imgs.length) return path.join(vmDir, g, imgs.sort().at(-1)!);
  }
  throw new BenchError('HYDRA_BENCH_WRONG_RESULT', `no image file of VM ${vm} under ${vmDir}`);
}

function rawRead(file: string): number {
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.allocUnsafe(8 * MiB);
    const size = fs.fstatSync(fd).size;
    const t = now();
    for (let pos = 0; pos < size; pos += buf.length) fs.readSync(fd, buf, 0, Math.min(buf.length, size - pos), pos);
    return size / MB / ((now() - t) / 1000);
  } finally {
    fs.closeSync(fd);
  }
}

/** The store's read bandwidth on this image, measured the same way a pager would use it and raw. */
async function storeBandwidth(env: BenchEnv, vm: string, generation: number, streams: number): Promise<StoreReadBandwidth> {
  const file = imageFile(env.storeDir, vm);
  const st = fs.statSync(file);
  // Evict the image from the page cache (fadvise DONTNEED through dd), then read it cold.
  execFileSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none']);
  const rawColdMBs = rawRead(file);
  const rawWarmMBs = rawRead(file);
  const clients = await Promise.all(Array.from({ length: streams }, () => StoreClient.connect({ address: env.store.address, secret: process.env.HYDRAVM_SECRET!, vm, generation, role: 'reader' })));
  try {
    const meta = await clients[0]!.getMeta(generation);
    if (!meta) throw new BenchError('HYDRA_BENCH_WRONG_RESULT', `store has no image of ${vm} generation ${generation}`);
    const size = meta.ramSize;
    let next = 0;
    let got = 0;
    const t = now();
    const slot = async (c: StoreClient) => {
      while (next < size) {
        const off = next;
        next += MAX_PAGES_DATA;
        for (const r of await c.readPageFrames([{ offset: off, length: Math.min(MAX_PAGES_DATA, size - off) }])) got += r.data.length;
      }
    };
    await Promise.all(clients.flatMap((c) => [slot(c), slot(c)]));
    const readPagesMBs = got / MB / ((now() - t) / 1000);
    return { imageBytes: st.size, allocatedBytes: st.blocks * 512, rawColdMBs, rawWarmMBs, readPagesMBs };
  } finally {
    await Promise.all(clients.map((c) => c.close()));
  }
}

async function pagingRun(env: BenchEnv, memory: string, control: string, baselineStepsPerS: number | null, opts: PagingBenchOptions, idx: number): Promise<PagingRun> {
  const name = `pg-${memory.toLowerCase()}-${idx}`;
  const spec = makeSpec(name, memory, opts);
  opts.log(`[${name}] boot, protect`);
  const { watch } = await boot(spec);
  try {
    await protectVm({ vm: name, store: env.store.address, intervalMs: opts.intervalMs, generation: 1 });
    await waitFor('two incremental checkpoints', () => (readProtection(name)?.committedEpoch ?? 0) >= 3, 120_000, 50);
    const state = readState(name)!;
    const killOffset = watch.offset;
    const tKill = now();
    process.kill(state.qemuPid!, 'SIGKILL');
    await waitFor(`${name} recorded crashed`, () => readState(name)?.lifecycle === 'crashed', 10_000, 10);
    await waitFor(`${name} supervisor gone`, () => !isLive(readState(name)), 10_000, 2);
    const cpu0 = { self: selfCpuMs(), store: processCpuMs(env.store.proc.pid!) };
    const tCall = now();
    const r = await restoreVm({
      vm: name, store: env.store.address, secret: process.env.HYDRAVM_SECRET!, mode: 'network',
      paging: { streams: opts.streams, ...controlOptions(control) },
    });
    const tRun = tCall + r.timings.totalMs;
    let tComplete: number | null = null;
    const stats = (await within(r.pager!.done.then((s) => { tComplete = now(); return s; }), 180_000)) ?? null;
    const cpu1 = { self: selfCpuMs(), store: processCpuMs(env.store.proc.pid!) };
    if (!stats) opts.log(`[${name}] memory not complete after 180 s`);
    const s = r.pager!.stats;
    const end = (tComplete as number | null) ?? now();
    const pagingStepsPerS = watch.rate(tRun, end, killOffset);
    await sleep(opts.windowS * 1000);
    const afterStepsPerS = watch.rate(end, now(), killOffset);
    const violations = countViolations(vmPaths(name).serialLog, killOffset);
    await r.pager!.stop();
    // Measured already: a VM that is gone by now changes nothing.
    await stopVm(name).catch(() => undefined);
    const store = await storeBandwidth(env, name, 1, opts.streams);
    const res: PagingRun = {
      memory, memoryBytes: parseSize(memory, '--paging-sizes'), control, streams: opts.streams,
      guardMinMBs: s.guardMinBytesPerS !== null ? s.guardMinBytesPerS / MB : null,
      killToRunningMs: tRun - tKill,
      completeAfterRunningMs: tComplete !== null ? (tComplete as number) - tRun : null,
      streamMs: s.streamMs,
      pagingMBs: s.streamMs ? s.bytesFetched / MB / (s.streamMs / 1000) : null,
      cpuMsPerMiB: {
        pager: s.bytesFetched ? (cpu1.self - cpu0.self) / (s.bytesFetched / MiB) : null,
        store: s.bytesFetched && cpu0.store !== null && cpu1.store !== null ? (cpu1.store - cpu0.store) / (s.bytesFetched / MiB) : null,
      },
      faults: s.faults, reconnects: s.reconnects,
      baselineStepsPerS, pagingStepsPerS, afterStepsPerS,
      slowdownPct: baselineStepsPerS && pagingStepsPerS !== null ? (1 - pagingStepsPerS / baselineStepsPerS) * 100 : null,
      violations, store,
    };
    opts.log(`[${name}] control ${control}${res.guardMinMBs !== null ? ` (down to ${fmt(res.guardMinMBs, 0)} MB/s)` : ''}: complete ${fmt(res.completeAfterRunningMs, 0)} ms after running, paging ${fmt(res.pagingMBs, 0)} MB/s (CPU ms/MiB pager ${fmt(res.cpuMsPerMiB.pager, 2)}, store ${fmt(res.cpuMsPerMiB.store, 2)}); store raw cold ${fmt(store.rawColdMBs, 0)} / warm ${fmt(store.rawWarmMBs, 0)} MB/s, READ_PAGES ${fmt(store.readPagesMBs, 0)} MB/s; steps/s baseline ${fmt(baselineStepsPerS)} paging ${fmt(pagingStepsPerS)} after ${fmt(afterStepsPerS)}; violations ${violations}`);
    return res;
  } finally {
    watch.close();
    // Cleanup after the measurement: a VM or protection already gone is what we want.
    await unprotectVm(name).catch(() => undefined);
    await stopVm(name).catch(() => undefined);
  }
}

export async function runPagingBench(env: BenchEnv, opts: PagingBenchOptions): Promise<PagingRun[]> {
  const runs: PagingRun[] = [];
  for (const memory of opts.sizes) {
    const baseline = await baselineRate(memory, opts);
    let i = 0;
    for (const control of opts.modes) runs.push(await pagingRun(env, memory, control, baseline, opts, ++i));
  }
  return runs;
}

/** 'guard': the restore's default rate control; 'none': unlimited, no control; a number: that fixed limit in MB/s, no control. */
function controlOptions(control: string): { guestDelay?: number; maxBytesPerS?: number } {
  if (control === 'guard') return {};
  if (control === 'none') return { guestDelay: 0 };
  const mbs = Number(control);
  if (!(mbs > 0)) throw new BenchError('HYDRA_BENCH_WRONG_RESULT', `--paging-modes: "${control}" is not guard, none or a rate in MB/s`);
  return { guestDelay: 0, maxBytesPerS: mbs * MB };
}

const pct = (a: number | null, b: number | null) => (a !== null && b ? `${fmt((100 * a) / b, 0)} %` : '-');

export function renderPaging(runs: PagingRun[], opts: PagingBenchOptions): string[] {
  const lines = [
    `## Network-mode paging (${opts.streams} background connections, 8 MiB batches; memcheck ${opts.workingSetMb} MB unthrottled, checkpoints every ${opts.intervalMs} ms)`,
    '',
    'Paging: bytes fetched over the background stream\'s duration. Store raw: sequential 8 MiB preads of the image file on the store host, cold (evicted first) and from the page cache. READ_PAGES: the whole image through the store protocol, no guest. Slowdown: memcheck steps/s while memory was paged in, against the same VM unprotected and never failed.',
    '',
    '| guest | stream control | memory complete after running | paging MB/s | CPU ms/MiB pager + store | store raw cold / warm MB/s | READ_PAGES MB/s | paging / raw cold | paging / READ_PAGES | steps/s unfailed / while paging / after | slowdown while paging | violations |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|',
  ];
  for (const r of runs) {
    const s = r.store;
    lines.push(`| ${r.memory} | ${r.control === 'guard' ? `guard (5 % vCPU wait${r.guardMinMBs !== null ? `, down to ${fmt(r.guardMinMBs, 0)} MB/s` : ', never engaged'})` : r.control === 'none' ? 'none' : `${r.control} MB/s`} | ${fmt(r.completeAfterRunningMs, 0)} ms | ${fmt(r.pagingMBs, 0)} | ${fmt(r.cpuMsPerMiB.pager, 2)} + ${fmt(r.cpuMsPerMiB.store, 2)} | ${fmt(s.rawColdMBs, 0)} / ${fmt(s.rawWarmMBs, 0)} | ${fmt(s.readPagesMBs, 0)} | ${pct(r.pagingMBs, s.rawColdMBs)} | ${pct(r.pagingMBs, s.readPagesMBs)} | ${fmt(r.baselineStepsPerS)} / ${fmt(r.pagingStepsPerS)} / ${fmt(r.afterStepsPerS)} | ${fmt(r.slowdownPct, 1)} % | ${r.violations} |`);
  }
  lines.push('', `Image files: ${runs.map((r) => `${r.memory} ${fmt(r.store.allocatedBytes / MiB, 0)} MiB allocated of ${fmt(r.store.imageBytes / MiB, 0)} MiB`).join('; ')} (holes read as zeros without disk I/O).`, '');
  lines.push(`Host: ${os.cpus().length} CPUs, load average at the end ${os.loadavg().map((v) => v.toFixed(2)).join(' ')}.`, '');
  return lines;
}
