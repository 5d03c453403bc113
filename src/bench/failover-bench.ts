import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { validateSpec, type VmSpec } from '../vm/spec.js';
import { startVm, stopVm, findQemu } from '../vm/manager.js';
import { vmPaths, readState, isLive, pidAlive, removeStaleSockets, listVmNames } from '../vm/runtime.js';
import { buildQemuArgs } from '../vm/qemu-args.js';
import { chooseAccel } from '../vm/accel.js';
import { countViolations } from '../vm/serial.js';
import { shimPath } from '../config/paths.js';
import { connectWhenReady, type QmpClient } from '../qmp/index.js';
import { protectVm, unprotectVm, readProtection } from '../checkpoint/protection.js';
import { restoreVm, type RestoreMode, type RestoreTimings, type PagerStats } from '../restore/index.js';
import { benchEnv, summary, fmt, writeResults, sleep, type BenchEnv, type Summary } from './harness.js';
import { barChart } from './svg-chart.js';

/**
 * `hydravm bench failover`: how long a protected VM is down when its QEMU
 * dies, split into detection, slim restore and the guest's first progress,
 * against QEMU's own full save/restore and a reboot, plus network-mode paging
 * (with and without prefetch) and the slowdown of the guest's work right
 * after the restore (the paper's Table II).
 *
 * Every fail-over runs on a freshly booted VM (whose boot is the reboot
 * baseline), protected at `intervalMs`; the kill is a SIGKILL of QEMU and
 * detection is the VM's supervisor recording `crashed` in state.json, polled
 * every 10 ms (the HA agent watches the same file).
 */
export interface FailoverBenchOptions {
  outDir: string;
  repeats: number;
  memory: string;
  workingSetMb: number;
  rateMb: number;
  intervalMs: number;
  /** Seconds of memcheck measured before the kill and after the restore. */
  windowS: number;
  /** Seconds a pure on-demand (no prefetch) restore runs before it is stopped. */
  noPrefetchS: number;
  log: (msg: string) => void;
}

const now = () => performance.now();

interface ProgressLine {
  /** performance.now() when the bench saw the line (polled every 10 ms). */
  t: number;
  step: number;
  /** Byte offset of the line's start in the serial log. */
  offset: number;
}

/** Follows a serial log and timestamps every memcheck progress line as it appears. */
class SerialWatch {
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

interface RunResult {
  mode: RestoreMode;
  prefetch: boolean;
  vm: string;
  accel: string;
  /** QEMU spawn (startVm) to the first memcheck progress line: the reboot baseline. */
  bootMs: number;
  initialCopyMs: number | null;
  epochAtKill: number;
  /** Last memcheck step printed before the kill, and the first printed by the restored VM. */
  stepBeforeKill: number | null;
  stepFirstAfter: number | null;
  /** SIGKILL to `crashed` in state.json. */
  detectMs: number;
  /** SIGKILL until the supervisor is gone too (restoreVm refuses while it lives). */
  goneMs: number;
  restore: RestoreTimings;
  /** SIGKILL to the restored guest running (cont returned). */
  killToRunningMs: number;
  /** SIGKILL to the first new memcheck progress line. */
  killToProgressMs: number | null;
  /** memcheck steps/s of the protected, unfailed VM in the window before the kill. */
  stepsPerSBefore: number | null;
  /** ... and in the window right after the restore. */
  stepsPerSAfter: number | null;
  pager?: PagerStats & { elapsedMs: number; faultsPerS: number | null; completeAfterRunningMs: number | null };
  violations: number;
}

interface QemuBaseline {
  vm: string;
  bootMs: number;
  /** migrate to file: of the stopped VM, until completed. */
  saveMs: number;
  fileBytes: number;
  /** New QEMU spawned until `cont` returned (incoming migration of the whole RAM). */
  spawnToRunningMs: number;
  /** spawn to QMP answering; migrate-incoming until completed. */
  spawnMs: number;
  loadMs: number;
  /** spawn to the first memcheck progress line of the restored guest. */
  spawnToProgressMs: number | null;
  /** The same restore again after evicting the saved file from the page cache. */
  cold?: { spawnToRunningMs: number; spawnMs: number; loadMs: number };
  violations: number;
}

function makeSpec(name: string, opts: FailoverBenchOptions): VmSpec {
  return validateSpec({
    name, memory: opts.memory, vcpus: 1, accel: 'auto', kernel: 'guest:vmlinux', initrd: 'guest:initrd.img',
    cmdline: `console=ttyS0 quiet hydra.run=memcheck memcheck.mb=${opts.workingSetMb} memcheck.rate=${opts.rateMb}`,
  }, process.cwd(), 'bench spec');
}

/** Boot a fresh VM; resolves at its first memcheck progress line. */
async function boot(spec: VmSpec): Promise<{ watch: SerialWatch; bootMs: number }> {
  fs.rmSync(vmPaths(spec.name).serialLog, { force: true });
  const watch = new SerialWatch(vmPaths(spec.name).serialLog);
  const t0 = now();
  await startVm(spec);
  const first = await watch.waitFirstAfter(0, 90_000);
  if (!first) {
    watch.close();
    throw new Error(`VM ${spec.name}: no memcheck progress within 90 s of its start (see ${vmPaths(spec.name).serialLog})`);
  }
  return { watch, bootMs: first.t - t0 };
}

async function waitFor(what: string, pred: () => boolean, timeoutMs: number, pollMs: number): Promise<number> {
  const deadline = now() + timeoutMs;
  for (;;) {
    if (pred()) return now();
    if (now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(pollMs);
  }
}

async function runFailover(env: BenchEnv, opts: FailoverBenchOptions, mode: RestoreMode, prefetch: boolean, idx: number): Promise<RunResult> {
  const name = `fo-${mode}${mode === 'network' && !prefetch ? '-nopf' : ''}-${idx}`;
  const spec = makeSpec(name, opts);
  opts.log(`[${name}] boot`);
  const { watch, bootMs } = await boot(spec);
  try {
    const prot = await protectVm({ vm: name, store: env.store.address, intervalMs: opts.intervalMs, generation: 1 });
    await waitFor('two incremental checkpoints', () => (readProtection(name)?.committedEpoch ?? 0) >= 3, 30_000, 50);
    const tA = now();
    await sleep(opts.windowS * 1000);
    const stepsPerSBefore = watch.rate(tA, now());

    // The failure: SIGKILL of QEMU.
    const state = readState(name)!;
    const epochAtKill = readProtection(name)?.committedEpoch ?? 0;
    const killOffset = watch.offset;
    const stepBeforeKill = watch.lines.length ? watch.lines[watch.lines.length - 1]!.step : null;
    const tKill = now();
    process.kill(state.qemuPid!, 'SIGKILL');
    const tDetect = await waitFor(`${name} recorded crashed`, () => readState(name)?.lifecycle === 'crashed', 10_000, 10);
    const tGone = await waitFor(`${name} supervisor gone`, () => !isLive(readState(name)), 10_000, 2);

    const tCall = now();
    const r = await restoreVm({ vm: name, store: env.store.address, secret: process.env.HYDRAVM_SECRET!, mode, storeDir: env.storeDir, prefetch });
    const tRun = tCall + r.timings.totalMs;
    let tComplete: number | null = null;
    r.pager?.done.then(() => { tComplete = now(); }, () => undefined);
    const progress = await watch.waitFirstAfter(killOffset, 30_000);
    const windowEnd = tRun + opts.windowS * 1000;
    if (now() < windowEnd) await sleep(windowEnd - now());
    const stepsPerSAfter = watch.rate(tRun, windowEnd, killOffset);

    let pager: RunResult['pager'];
    if (r.pager) {
      if (prefetch) {
        await Promise.race([r.pager.done.catch(() => undefined), sleep(30_000)]);
      } else {
        const stopAt = tRun + opts.noPrefetchS * 1000;
        if (now() < stopAt) await sleep(stopAt - now());
      }
      const s = { ...r.pager.stats };
      const elapsedMs = s.completeMs ?? now() - tRun;
      pager = {
        ...s,
        elapsedMs,
        faultsPerS: elapsedMs > 0 ? s.faults / (elapsedMs / 1000) : null,
        completeAfterRunningMs: tComplete !== null ? (tComplete as number) - tRun : null,
      };
      // Memory may be incomplete (demand paging only): stop serving it, then the VM.
      await r.pager.stop();
      if (!prefetch) await stopVm(name).catch(() => undefined);
    }
    const res: RunResult = {
      mode, prefetch, vm: name, accel: state.accel ?? '?', bootMs,
      initialCopyMs: prot.initialCopy?.ms ?? null,
      epochAtKill, stepBeforeKill, stepFirstAfter: progress?.step ?? null,
      detectMs: tDetect - tKill,
      goneMs: tGone - tKill,
      restore: r.timings,
      killToRunningMs: tRun - tKill,
      killToProgressMs: progress ? progress.t - tKill : null,
      stepsPerSBefore, stepsPerSAfter, pager,
      violations: countViolations(vmPaths(name).serialLog, killOffset),
    };
    opts.log(`[${name}] detect ${fmt(res.detectMs)} ms, spawn->running ${fmt(r.timings.spawnToRunningMs)} ms (device load ${fmt(r.timings.deviceLoadMs)}), kill->running ${fmt(res.killToRunningMs)} ms, kill->progress ${fmt(res.killToProgressMs)} ms, steps/s ${fmt(stepsPerSBefore)} -> ${fmt(stepsPerSAfter)}${pager ? `, faults ${pager.faults}, prefetched ${pager.pagesPrefetched}, complete ${fmt(pager.completeAfterRunningMs)} ms after running` : ''}, violations ${res.violations}`);
    return res;
  } finally {
    watch.close();
    await unprotectVm(name).catch(() => undefined);
    await stopVm(name).catch(() => undefined);
  }
}

async function waitMigration(qmp: QmpClient, what: string): Promise<void> {
  const deadline = now() + 120_000;
  for (;;) {
    const info = await qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate');
    if (info.status === 'completed') return;
    if (info.status === 'failed' || info.status === 'cancelled') throw new Error(`${what}: migration ${info.status}: ${info['error-desc'] ?? ''}`);
    if (now() > deadline) throw new Error(`${what}: migration not completed within 120 s`);
    await sleep(5);
  }
}

/**
 * QEMU's own full save/restore: `migrate` of the stopped VM to `file:`, then a
 * new QEMU with the same arguments and `-incoming defer`, `migrate-incoming`,
 * `cont`. The saved file is still in the page cache when it is loaded (as the
 * store's image is for a slim restore on the same machine).
 */
async function runQemuBaseline(env: BenchEnv, opts: FailoverBenchOptions): Promise<QemuBaseline> {
  const name = 'fo-qemu';
  const spec = makeSpec(name, opts);
  const paths = vmPaths(name);
  opts.log(`[${name}] boot (QEMU full save/restore baseline)`);
  const { watch, bootMs } = await boot(spec);
  const saveFile = path.join(env.home, 'qemu-full-save.bin');
  let child: ChildProcess | undefined;
  try {
    await sleep(3000);
    const qmp = await connectWhenReady(paths.qmpSocket, { label: `VM ${name}` });
    await qmp.execute('stop');
    const tSave = now();
    await qmp.execute('migrate', { uri: `file:${saveFile}` });
    await waitMigration(qmp, `${name} save`);
    const saveMs = now() - tSave;
    qmp.close();
    const fileBytes = fs.statSync(saveFile).size;
    await stopVm(name);

    // The same arguments as the primary (buildQemuArgs), incoming. The primary
    // sent its configuration section, so the receiver must expect it: drop the
    // send-configuration=off that slim restores (whose device state has none) use.
    const accel = chooseAccel(spec.accel, name);
    const args = buildQemuArgs(spec, paths, { accel, incomingDefer: true });
    const gi = args.indexOf('migration.send-configuration=off');
    if (gi > 0) args.splice(gi - 1, 2);
    const offset = watch.offset;
    const fullRestore = async () => {
      removeStaleSockets(name);
      const logFd = fs.openSync(paths.qemuLog, 'a');
      const tSpawn = now();
      const c = spawn(findQemu(), args, { stdio: ['ignore', logFd, logFd], env: { ...process.env, LD_PRELOAD: shimPath } });
      child = c;
      fs.closeSync(logFd);
      const exited = () => c.exitCode !== null || c.signalCode !== null;
      const q2 = await connectWhenReady(paths.hydraQmpSocket, { label: `VM ${name} (full restore)`, deadlineMs: 20_000, isAlive: () => !exited() });
      const spawnMs = now() - tSpawn;
      const tLoad = now();
      await q2.execute('migrate-incoming', { uri: `file:${saveFile}` });
      await waitMigration(q2, `${name} load`);
      const loadMs = now() - tLoad;
      await q2.execute('cont');
      const spawnToRunningMs = now() - tSpawn;
      q2.close();
      return { tSpawn, spawnMs, loadMs, spawnToRunningMs };
    };
    const killChild = async () => {
      const c = child;
      if (c && c.exitCode === null && c.signalCode === null) {
        c.kill('SIGKILL');
        await new Promise((r) => c.once('exit', r));
      }
    };
    const warm = await fullRestore();
    const progress = await watch.waitFirstAfter(offset, 20_000);
    const { tSpawn, spawnMs, loadMs, spawnToRunningMs } = warm;
    const violations = countViolations(paths.serialLog, offset);
    await killChild();
    // Again from a cold page cache: evict the saved file (fadvise DONTNEED via dd) and nothing else.
    let cold: QemuBaseline['cold'];
    try {
      execFileSync('dd', [`if=${saveFile}`, 'iflag=nocache', 'count=0', 'status=none']);
      const c = await fullRestore();
      cold = { spawnToRunningMs: c.spawnToRunningMs, spawnMs: c.spawnMs, loadMs: c.loadMs };
      await killChild();
    } catch (err) {
      opts.log(`[${name}] cold-cache full restore skipped: ${(err as Error).message}`);
    }
    const res: QemuBaseline = {
      vm: name, bootMs, saveMs, fileBytes, spawnToRunningMs, spawnMs, loadMs,
      spawnToProgressMs: progress ? progress.t - tSpawn : null,
      cold,
      violations,
    };
    opts.log(`[${name}] save ${fmt(saveMs)} ms (${fmt(fileBytes / 2 ** 20)} MB), full restore spawn->running ${fmt(spawnToRunningMs)} ms (load ${fmt(loadMs)} ms), spawn->progress ${fmt(res.spawnToProgressMs)} ms; cold cache spawn->running ${fmt(cold?.spawnToRunningMs)} ms`);
    return res;
  } finally {
    watch.close();
    const c = child as ChildProcess | undefined;
    if (c && c.exitCode === null && c.signalCode === null) {
      c.kill('SIGKILL');
      await new Promise((r) => c.once('exit', r));
    }
    await stopVm(name).catch(() => undefined);
    removeStaleSockets(name);
    fs.rmSync(saveFile, { force: true });
  }
}

function loadavg(): { uptime: string; loadavg: number[] } {
  let uptime = '';
  try {
    uptime = execFileSync('uptime', { encoding: 'utf8' }).trim();
  } catch {
    uptime = '';
  }
  return { uptime, loadavg: os.loadavg().map((v) => Math.round(v * 100) / 100) };
}

const med = (xs: (number | null | undefined)[]): number | null => summary(xs.filter((v): v is number => typeof v === 'number')).median;
const range = (xs: (number | null | undefined)[], digits = 0): string => {
  const s = summary(xs.filter((v): v is number => typeof v === 'number'));
  if (s.n === 0) return '-';
  return s.n === 1 ? fmt(s.median, digits) : `${fmt(s.median, digits)} (${fmt(s.min, digits)}-${fmt(s.max, digits)})`;
};

export async function runFailoverBench(opts: FailoverBenchOptions) {
  const startedAt = new Date().toISOString();
  const loadBefore = loadavg();
  opts.log(`load before: ${loadBefore.uptime}`);
  const env = await benchEnv('failover');
  const runs: RunResult[] = [];
  let qemu: QemuBaseline | undefined;
  const t0 = now();
  try {
    qemu = await runQemuBaseline(env, opts);
    for (let i = 1; i <= opts.repeats; i++) {
      runs.push(await runFailover(env, opts, 'file', true, i));
      runs.push(await runFailover(env, opts, 'network', true, i));
    }
    runs.push(await runFailover(env, opts, 'network', false, 1));
  } finally {
    for (const n of listVmNames()) {
      const s = readState(n);
      if (s && (isLive(s) || pidAlive(s.qemuPid))) await stopVm(n).catch(() => undefined);
    }
    await env.close();
  }
  const durationS = (now() - t0) / 1000;
  const loadAfter = loadavg();
  opts.log(`load after: ${loadAfter.uptime}`);

  const file = runs.filter((r) => r.mode === 'file');
  const net = runs.filter((r) => r.mode === 'network' && r.prefetch);
  const nopf = runs.filter((r) => r.mode === 'network' && !r.prefetch);
  const groups: [string, RunResult[]][] = [['file', file], ['network', net]];
  const pick = (rs: RunResult[], f: (r: RunResult) => number | null | undefined) => rs.map(f);

  const split = (rs: RunResult[]) => ({
    n: rs.length,
    detectMs: summary(rs.map((r) => r.detectMs)),
    goneMs: summary(rs.map((r) => r.goneMs)),
    prepareMs: summary(rs.map((r) => r.restore.prepareMs)),
    spawnMs: summary(rs.map((r) => r.restore.spawnMs)),
    deviceLoadMs: summary(rs.map((r) => r.restore.deviceLoadMs)),
    spawnToRunningMs: summary(rs.map((r) => r.restore.spawnToRunningMs)),
    launchToRunningMs: summary(rs.map((r) => r.restore.launchToRunningMs)),
    restoreTotalMs: summary(rs.map((r) => r.restore.totalMs)),
    killToRunningMs: summary(rs.map((r) => r.killToRunningMs)),
    killToProgressMs: summary(rs.map((r) => r.killToProgressMs).filter((v): v is number => v !== null)),
  });
  const splits: Record<string, ReturnType<typeof split>> = { file: split(file), network: split(net) };
  if (nopf.length) splits['network-noprefetch'] = split(nopf);

  const bootMs = summary(runs.map((r) => r.bootMs).concat(qemu ? [qemu.bootMs] : []));
  const speedup = (rs: RunResult[]) => {
    const m = med(pick(rs, (r) => r.restore.spawnToRunningMs));
    return qemu && m ? qemu.spawnToRunningMs / m : null;
  };
  const loadSpeedup = (rs: RunResult[]) => {
    const m = med(pick(rs, (r) => r.restore.deviceLoadMs));
    return qemu && m ? qemu.loadMs / m : null;
  };
  const coldSpeedup = (rs: RunResult[]) => {
    const m = med(pick(rs, (r) => r.restore.spawnToRunningMs));
    return qemu?.cold && m ? qemu.cold.spawnToRunningMs / m : null;
  };
  const supervisorMs = (r: RunResult) => r.restore.launchToRunningMs - r.restore.spawnToRunningMs;
  const pfFaults = med(pick(net, (r) => r.pager?.faults));
  const npFaults = med(pick(nopf, (r) => r.pager?.faults));
  const faultRatio = pfFaults !== null && npFaults !== null ? npFaults / Math.max(1, pfFaults) : null;

  const unfailed = med(pick(runs, (r) => r.stepsPerSBefore));
  const slowRows: [string, RunResult[]][] = [['network + prefetch', net], ['network, no prefetch', nopf], ['file', file]];
  const slowdown = slowRows.map(([label, rs]) => {
    const after = med(pick(rs, (r) => r.stepsPerSAfter));
    const before = med(pick(rs, (r) => r.stepsPerSBefore));
    return { config: label, runs: rs.length, stepsPerSBefore: before, stepsPerSAfter: after, unfailedAll: unfailed, slowdownPct: after !== null && unfailed ? (1 - after / unfailed) * 100 : null };
  });

  const allS2R = runs.filter((r) => r.prefetch).map((r) => r.restore.spawnToRunningMs);
  const targets = [
    { target: 'spawn to running < 150 ms (file)', value: splits.file!.spawnToRunningMs.median, unit: 'ms', met: (splits.file!.spawnToRunningMs.median ?? Infinity) < 150 },
    { target: 'spawn to running < 150 ms (network)', value: splits.network!.spawnToRunningMs.median, unit: 'ms', met: (splits.network!.spawnToRunningMs.median ?? Infinity) < 150 },
    { target: 'spawn to running < 150 ms (every run)', value: allS2R.length ? Math.max(...allS2R) : null, unit: 'ms (max)', met: allS2R.every((v) => v < 150) },
    { target: 'QEMU death to running restored VM < 1 s (file)', value: splits.file!.killToRunningMs.median, unit: 'ms', met: (splits.file!.killToRunningMs.median ?? Infinity) < 1000 },
    { target: 'QEMU death to running restored VM < 1 s (network)', value: splits.network!.killToRunningMs.median, unit: 'ms', met: (splits.network!.killToRunningMs.median ?? Infinity) < 1000 },
    { target: 'slim restore >= 10x faster than QEMU full restore (file)', value: speedup(file), unit: 'x', met: (speedup(file) ?? 0) >= 10 },
    { target: 'slim restore >= 10x faster than QEMU full restore (network)', value: speedup(net), unit: 'x', met: (speedup(net) ?? 0) >= 10 },
    { target: 'slim restore >= 10x faster than QEMU full restore from a cold page cache (file)', value: coldSpeedup(file), unit: 'x', met: (coldSpeedup(file) ?? 0) >= 10 },
    { target: 'slim restore >= 10x faster than QEMU full restore from a cold page cache (network)', value: coldSpeedup(net), unit: 'x', met: (coldSpeedup(net) ?? 0) >= 10 },
    { target: 'prefetch cuts demand faults >= 5x', value: faultRatio, unit: 'x', met: (faultRatio ?? 0) >= 5 },
  ];

  const json = {
    benchmark: 'failover',
    date: startedAt,
    durationS: Math.round(durationS),
    host: { cpus: os.cpus().length, memGiB: Math.round(os.totalmem() / 2 ** 30), kernel: os.release(), loadBefore, loadAfter },
    guest: { memory: opts.memory, accel: 'auto', workload: `memcheck mb=${opts.workingSetMb} rate=${opts.rateMb} MB/s`, protectionIntervalMs: opts.intervalMs },
    method: {
      kill: 'SIGKILL of QEMU; detection = supervisor records crashed in state.json (polled every 10 ms)',
      restore: 'restoreVm() in-process (network-mode pager runs in the bench process)',
      progress: 'first memcheck progress line after the kill offset (serial log polled every 10 ms; memcheck prints at most every 0.25 s)',
      stepsPerS: `steps since the first line in a ${opts.windowS} s window / time from the window start to the last line in it`,
      noPrefetch: `stopped after ${opts.noPrefetchS} s`,
    },
    splits,
    baselines: {
      qemuFullSaveRestore: qemu,
      rebootMs: bootMs,
      slimSpeedup: { file: speedup(file), network: speedup(net) },
      slimSpeedupVsColdCache: { file: coldSpeedup(file), network: coldSpeedup(net) },
      loadPhaseSpeedup: { file: loadSpeedup(file), network: loadSpeedup(net) },
    },
    paging: {
      prefetch: { faults: summary(pick(net, (r) => r.pager?.faults).filter((v): v is number => v !== undefined)), runs: net.map((r) => r.pager) },
      noPrefetch: { runs: nopf.map((r) => r.pager) },
      faultReduction: faultRatio,
    },
    slowdown,
    targets,
    runs,
  };

  const md: string[] = [];
  md.push(`Host: ${os.cpus().length} CPUs, QEMU accel ${runs[0]?.accel ?? '?'}; load before: \`${loadBefore.uptime}\`; after: \`${loadAfter.uptime}\`. Run took ${Math.round(durationS)} s, ${startedAt}.`);
  md.push(`Guest: ${opts.memory}, memcheck ${opts.workingSetMb} MB at ${opts.rateMb} MB/s, protected every ${opts.intervalMs / 1000} s. Medians of ${opts.repeats} fail-overs per mode (min-max in parentheses); each on a freshly booted VM.`);
  md.push('');
  md.push('### Fail-over time split (ms)');
  md.push('');
  md.push('| mode | runs | kill → detected | kill → supervisor gone | restore prepare | supervisor start (launch → QEMU spawn) | QEMU spawn → running | of which device load | kill → running | kill → guest progress |');
  md.push('|---|---|---|---|---|---|---|---|---|---|');
  for (const [label, rs] of [...groups, ['network, no prefetch', nopf] as [string, RunResult[]]]) {
    if (!rs.length) continue;
    md.push(`| ${label} | ${rs.length} | ${range(pick(rs, (r) => r.detectMs))} | ${range(pick(rs, (r) => r.goneMs))} | ${range(pick(rs, (r) => r.restore.prepareMs))} | ${range(pick(rs, supervisorMs))} | ${range(pick(rs, (r) => r.restore.spawnToRunningMs))} | ${range(pick(rs, (r) => r.restore.deviceLoadMs), 1)} | ${range(pick(rs, (r) => r.killToRunningMs))} | ${range(pick(rs, (r) => r.killToProgressMs))} |`);
  }
  md.push('');
  md.push('### Baselines (same guest, same run)');
  md.push('');
  md.push('| what | time | notes |');
  md.push('|---|---|---|');
  if (qemu) {
    md.push(`| QEMU full save (migrate to file: of the stopped VM) | ${fmt(qemu.saveMs, 0)} ms | ${fmt(qemu.fileBytes / 2 ** 20, 0)} MB file |`);
    md.push(`| QEMU full restore: spawn → running | ${fmt(qemu.spawnToRunningMs, 0)} ms | spawn → QMP ${fmt(qemu.spawnMs, 0)} ms, load ${fmt(qemu.loadMs, 0)} ms; spawn → guest progress ${fmt(qemu.spawnToProgressMs, 0)} ms |`);
  }
  md.push(`| reboot: spawn → first memcheck progress | ${range(runs.map((r) => r.bootMs).concat(qemu ? [qemu.bootMs] : []))} ms | ${bootMs.n} boots |`);
  md.push(`| slim restore QEMU spawn → running, file / network | ${fmt(splits.file!.spawnToRunningMs.median, 0)} / ${fmt(splits.network!.spawnToRunningMs.median, 0)} ms | speedup vs QEMU full restore (page cache warm): ${fmt(speedup(file))}x / ${fmt(speedup(net))}x |`);
  if (qemu?.cold) md.push(`| QEMU full restore, saved file evicted from the page cache first: spawn → running | ${fmt(qemu.cold.spawnToRunningMs, 0)} ms | load ${fmt(qemu.cold.loadMs, 0)} ms; slim speedup vs this: ${fmt(coldSpeedup(file))}x / ${fmt(coldSpeedup(net))}x |`);
  md.push(`| load phase only: full RAM + devices vs device state | ${qemu ? fmt(qemu.loadMs, 0) : '-'} ms vs ${fmt(splits.file!.deviceLoadMs.median, 1)} / ${fmt(splits.network!.deviceLoadMs.median, 1)} ms | ${fmt(loadSpeedup(file), 0)}x / ${fmt(loadSpeedup(net), 0)}x |`);
  md.push('');
  md.push('### Network mode paging');
  md.push('');
  md.push('| prefetch | runs | demand faults | faults/s | pages prefetched | pages fetched on faults | memory complete after running | slowest fault |');
  md.push('|---|---|---|---|---|---|---|---|');
  if (net.length) md.push(`| on | ${net.length} | ${range(pick(net, (r) => r.pager?.faults))} | ${range(pick(net, (r) => r.pager?.faultsPerS), 1)} | ${range(pick(net, (r) => r.pager?.pagesPrefetched))} | ${range(pick(net, (r) => r.pager?.faultPagesFetched))} | ${range(pick(net, (r) => r.pager?.completeAfterRunningMs))} ms | ${range(pick(net, (r) => r.pager?.maxFaultMs), 1)} ms |`);
  if (nopf.length) md.push(`| off (stopped after ${opts.noPrefetchS} s) | ${nopf.length} | ${range(pick(nopf, (r) => r.pager?.faults))} | ${range(pick(nopf, (r) => r.pager?.faultsPerS), 1)} | 0 | ${range(pick(nopf, (r) => r.pager?.faultPagesFetched))} (${fmt((med(pick(nopf, (r) => r.pager?.bytesFetched)) ?? 0) / 2 ** 20, 0)} MB) | not complete (${fmt((100 * (med(pick(nopf, (r) => r.pager?.pagesPresent)) ?? 0)) / (nopf[0]?.pager?.pagesTotal ?? 1), 0)}% present) | ${range(pick(nopf, (r) => r.pager?.maxFaultMs), 1)} ms |`);
  md.push('');
  md.push(`Prefetch cuts demand faults ${fmt(faultRatio)}x (faults without prefetch in ${opts.noPrefetchS} s / faults with prefetch until memory complete).`);
  md.push('');
  md.push(`### Slowdown of the remaining memcheck work (${opts.windowS} s after the restore vs the unfailed protected VM)`);
  md.push('');
  md.push('| configuration | runs | steps/s before kill (same runs) | steps/s after restore | slowdown vs unfailed (all runs) |');
  md.push('|---|---|---|---|---|');
  md.push(`| unfailed, protected every ${opts.intervalMs / 1000} s | ${runs.length} | ${range(pick(runs, (r) => r.stepsPerSBefore), 1)} | - | - |`);
  for (const s of slowdown) {
    if (!s.runs) continue;
    md.push(`| ${s.config} | ${s.runs} | ${fmt(s.stepsPerSBefore)} | ${range(pick(s.config === 'file' ? file : s.config === 'network + prefetch' ? net : nopf, (r) => r.stepsPerSAfter), 1)} | ${fmt(s.slowdownPct)} % |`);
  }
  md.push('');
  md.push('### Targets');
  md.push('');
  md.push('| target | measured | met |');
  md.push('|---|---|---|');
  for (const t of targets) md.push(`| ${t.target} | ${t.unit === 'x' ? fmt(t.value) : fmt(t.value, 0)} ${t.unit} | ${t.met ? 'yes' : '**no**'} |`);
  const violations = runs.reduce((a, r) => a + r.violations, 0) + (qemu?.violations ?? 0);
  md.push('');
  md.push(`memcheck violations after restores: ${violations}.`);
  const markdown = md.join('\n') + '\n';

  const cats = ['kill→detected', 'restore prepare', 'spawn→running', 'device load', 'kill→running', 'kill→progress'];
  const splitSeries = groups.map(([label, rs]) => ({
    name: label,
    values: [med(pick(rs, (r) => r.detectMs)), med(pick(rs, (r) => r.restore.prepareMs)), med(pick(rs, (r) => r.restore.spawnToRunningMs)), med(pick(rs, (r) => r.restore.deviceLoadMs)), med(pick(rs, (r) => r.killToRunningMs)), med(pick(rs, (r) => r.killToProgressMs))],
  }));
  const charts: Record<string, string> = {
    'failover-split.svg': barChart({ title: 'Fail-over time split (median)', unit: 'ms', categories: cats, series: splitSeries, target: { value: 1000, label: 'target: death → running 1 s' } }),
    'failover-vs-baselines.svg': barChart({
      title: 'Restore spawn → running vs baselines (median)', unit: 'ms',
      categories: ['slim, file', 'slim, network', 'QEMU full (warm)', 'QEMU full (cold)', 'reboot (to progress)'],
      series: [{ name: 'spawn → running', values: [splits.file!.spawnToRunningMs.median, splits.network!.spawnToRunningMs.median, qemu?.spawnToRunningMs ?? null, qemu?.cold?.spawnToRunningMs ?? null, bootMs.median] }],
    }),
    'failover-paging.svg': barChart({
      title: 'Network mode: demand faults', unit: 'faults',
      categories: ['prefetch (until complete)', `no prefetch (${opts.noPrefetchS} s)`],
      series: [{ name: 'demand faults (median)', values: [pfFaults, npFaults] }],
    }),
    'failover-slowdown.svg': barChart({
      title: `memcheck steps/s: unfailed vs ${opts.windowS} s after restore`, unit: 'steps/s',
      categories: ['unfailed', ...slowdown.filter((s) => s.runs).map((s) => s.config)],
      series: [{ name: 'steps/s (median)', values: [unfailed, ...slowdown.filter((s) => s.runs).map((s) => s.stepsPerSAfter)] }],
    }),
  };
  const files = writeResults(opts.outDir, 'failover', json, markdown, charts);
  return { json, markdown, files };
}
