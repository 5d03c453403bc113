// `hydravm bench failover`: runs the fail-overs and the QEMU baseline, then hands the results to the analysis and the report.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { shellConfigOf, startShell, stopAllShells } from '../vm/index.js';
import { validateSpec, type VmSpec, startVm, stopVm, findQemu, vmPaths, readState, isLive, removeStaleSockets, listVmNames, buildQemuArgs, chooseAccel, countViolations } from '../vm/index.js';
import { pidAlive } from '../util/pid.js';
import { shimPath } from '../config/paths.js';
import { connectWhenReady, type QmpClient } from '../qmp/index.js';
import { protectVm, unprotectVm, readProtection } from '../checkpoint/index.js';
import { restoreVm, type RestoreMode } from '../restore/index.js';
import { benchEnv, fmt, writeResults, sleep, waitFor, type BenchEnv } from './harness.js';
import { within } from '../util/sleep.js';
import { analyseFailover } from './failover-analysis.js';
import type { FailoverBenchOptions, QemuBaseline, RunResult } from './failover-results.js';
import { renderFailover } from './failover-report.js';
import { boot } from './serial-watch.js';
import { renderFencing, runFencingBench, type FencingResult } from './failover-fencing.js';
import { renderPaging, runPagingBench, type PagingRun } from './failover-paging.js';
import { BenchError } from '../errors.js';
import { renderWarmCold } from './failover-warm.js';

export type { FailoverBenchOptions } from './failover-results.js';

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

const now = () => performance.now();

function makeSpec(name: string, opts: FailoverBenchOptions): VmSpec {
  return validateSpec({
    name, memory: opts.memory, vcpus: 1, accel: 'auto', kernel: 'guest:vmlinux', initrd: 'guest:initrd.img',
    cmdline: `console=ttyS0 quiet hydra.run=memcheck memcheck.mb=${opts.workingSetMb} memcheck.rate=${opts.rateMb}`,
  }, process.cwd(), 'bench spec');
}


async function runFailover(env: BenchEnv, opts: FailoverBenchOptions, mode: RestoreMode, prefetch: boolean, idx: number, warm = false): Promise<RunResult> {
  const name = `fo-${mode}${mode === 'network' && !prefetch ? '-nopf' : ''}${warm ? '-warm' : ''}-${idx}`;
  const spec = makeSpec(name, opts);
  opts.log(`[${name}] boot`);
  const { watch, bootMs } = await boot(spec);
  try {
    if (warm) {
      // The restoration host's shell, started (and idle) well before the failure, as an agent's pool keeps it.
      const cfg = shellConfigOf(spec, chooseAccel(spec.accel, spec.name), []);
      if ('reason' in cfg) throw new BenchError('HYDRA_BENCH_BAD_OPTION', `[${name}] no restore shell possible: ${cfg.reason}`);
      await startShell(cfg.config);
    }
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
    const r = await restoreVm({ vm: name, store: env.store.address, secret: process.env.HYDRAVM_SECRET!, mode, storeDir: env.storeDir, prefetch, shell: warm ? 'auto' : 'never' });
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
        // The pager's own stats (read next) show whether it completed; the bench goes on either way.
        await within(r.pager.done.catch(() => undefined), 30_000);
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
      // Cleanup between runs: a VM already gone is what we want.
      if (!prefetch) await stopVm(name).catch(() => undefined);
    }
    const res: RunResult = {
      mode, prefetch, warm, ...(r.shell.used ? {} : { shellMiss: r.shell.reason }), vm: name, accel: state.accel ?? '?', bootMs,
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
    opts.log(`[${name}] ${r.shell.used ? `warm (shell ${r.shell.id}, hand-off ${fmt(r.timings.shellHandoffMs ?? 0)} ms)` : `cold (${r.shell.reason})`}, detect ${fmt(res.detectMs)} ms, spawn->running ${fmt(r.timings.spawnToRunningMs)} ms (device load ${fmt(r.timings.deviceLoadMs)}), kill->running ${fmt(res.killToRunningMs)} ms, kill->progress ${fmt(res.killToProgressMs)} ms, steps/s ${fmt(stepsPerSBefore)} -> ${fmt(stepsPerSAfter)}${pager ? `, faults ${pager.faults}, prefetched ${pager.pagesPrefetched}, complete ${fmt(pager.completeAfterRunningMs)} ms after running` : ''}, violations ${res.violations}`);
    return res;
  } finally {
    watch.close();
    // Cleanup after the measurement: a VM or protection already gone is what we want.
    await unprotectVm(name).catch(() => undefined);
    await stopVm(name).catch(() => undefined);
  }
}

async function waitMigration(qmp: QmpClient, what: string): Promise<void> {
  const deadline = now() + 120_000;
  for (;;) {
    const info = await qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate');
    if (info.status === 'completed') return;
    if (info.status === 'failed' || info.status === 'cancelled') throw new BenchError('HYDRA_BENCH_MIGRATION_FAILED', `${what}: migration ${info.status}: ${info['error-desc'] ?? ''}`);
    if (now() > deadline) throw new BenchError('HYDRA_BENCH_MIGRATION_FAILED', `${what}: migration not completed within 120 s`);
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
    // Cleanup after the baseline: a VM already gone is what we want.
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

export async function runFailoverBench(opts: FailoverBenchOptions) {
  const startedAt = new Date().toISOString();
  const loadBefore = loadavg();
  opts.log(`load before: ${loadBefore.uptime}`);
  const env = await benchEnv('failover');
  const runs: RunResult[] = [];
  let qemu: QemuBaseline | undefined;
  let fencing: FencingResult | undefined;
  let paging: PagingRun[] = [];
  const pagingOpts = opts.paging && opts.paging.sizes.length > 0 && !opts.fencingOnly
    ? { ...opts.paging, workingSetMb: opts.workingSetMb, intervalMs: opts.intervalMs, windowS: opts.windowS, log: opts.log }
    : undefined;
  const t0 = now();
  try {
    if (opts.pagingOnly) {
      if (pagingOpts) paging = await runPagingBench(env, pagingOpts);
    } else if (!opts.fencingOnly) {
      if (!opts.noQemuBaseline) qemu = await runQemuBaseline(env, opts);
      const shells = opts.shells ?? 'both';
      for (let i = 1; i <= opts.repeats; i++) {
        for (const mode of ['file', 'network'] as const) {
          if (shells !== 'warm') runs.push(await runFailover(env, opts, mode, true, i));
          if (shells !== 'cold') runs.push(await runFailover(env, opts, mode, true, i, true));
        }
      }
      if (shells !== 'warm') runs.push(await runFailover(env, opts, 'network', false, 1));
      if (pagingOpts) paging = await runPagingBench(env, pagingOpts);
    }
    if (opts.fencingRounds > 0 && !opts.pagingOnly) fencing = await runFencingBench(env, opts, opts.fencingRounds);
  } finally {
    for (const n of listVmNames()) {
      const s = readState(n);
      // Best-effort sweep of whatever a failed run left; the run's own error is what the user sees.
      if (s && (isLive(s) || pidAlive(s.qemuPid))) await stopVm(n).catch(() => undefined);
    }
    // Shells a failed run left idle (each also ends itself with this process).
    await stopAllShells();
    await env.close();
  }
  const durationS = (now() - t0) / 1000;
  const loadAfter = loadavg();
  opts.log(`load after: ${loadAfter.uptime}`);

  const fencingMd = fencing ? renderFencing(fencing).join('\n') + '\n' : '';
  const pagingMd = pagingOpts && paging.length ? renderPaging(paging, pagingOpts).join('\n') + '\n' : '';
  if (opts.pagingOnly) {
    const json = { startedAt, durationS, loadBefore, loadAfter, options: { ...opts, log: undefined }, paging };
    const markdown = `# Fail-over benchmark: network-mode paging only\n\n${loadBefore.uptime}\n\n${pagingMd}`;
    const files = writeResults(opts.outDir, 'failover-paging', json, markdown, {});
    return { json, markdown, files };
  }
  if (opts.fencingOnly) {
    const json = { startedAt, durationS, loadBefore, loadAfter, options: { ...opts, log: undefined }, fencing };
    const markdown = `# Fail-over benchmark: self-fencing only\n\n${loadBefore.uptime}\n\n${fencingMd}`;
    const files = writeResults(opts.outDir, 'failover-fencing', json, markdown, {});
    return { json, markdown, files };
  }
  // The established tables compare cold starts (as before restore shells); warm runs get their own table beside them.
  const coldRuns = runs.filter((x) => !x.warm);
  const analysis = analyseFailover(coldRuns.length > 0 ? coldRuns : runs, qemu);
  const r = renderFailover(opts, { startedAt, durationS, loadBefore, loadAfter }, coldRuns.length > 0 ? coldRuns : runs, qemu, analysis);
  const warmCold = renderWarmCold(runs);
  const json = { ...(r.json as object), fencing, warmCold: warmCold.json, allRuns: runs, paging };
  const markdown = r.markdown + `\n${warmCold.markdown}` + (fencingMd ? `\n${fencingMd}` : '') + (pagingMd ? `\n${pagingMd}` : '');
  const files = writeResults(opts.outDir, 'failover', json, markdown, r.charts);
  return { json, markdown, files };
}
