// Fair baselines: QEMU's own full save/restore of a fully populated guest, from a warm and from a verified-cold page cache.
import fs from 'node:fs';
import path from 'node:path';
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { stopVm, findQemu, vmPaths, removeStaleSockets, buildQemuArgs, chooseAccel } from '../../../vm/index.js';
import { shimPath } from '../../../config/paths.js';
import { benchEnv } from '../../harness.js';
import { connectWhenReady, type QmpClient } from '../../../qmp/index.js';
import { BenchError } from '../../../errors.js';
import { sleep } from '../../../util/sleep.js';
import { bootMemcheck, fullWorkingSetMb, stopQuietly } from '../memcheck-guest.js';
import type { Part } from '../part.js';

export interface BaselineSample {
  sizeGb: number;
  memoryMb: number;
  workingSetMb: number;
  cache: 'cold' | 'warm';
  repeat: number;
  saveMs: number;
  fileMb: number;
  /** Bytes of the saved file in the page cache just before the load (fincore), and whether that is ~none. */
  residentMbBefore: number | null;
  coldVerified: boolean | null;
  spawnMs: number;
  loadMs: number;
  spawnToRunningMs: number;
}

async function waitMigration(qmp: QmpClient, what: string, timeoutMs: number): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const info = await qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate');
    if (info.status === 'completed') return;
    if (info.status === 'failed' || info.status === 'cancelled') throw new BenchError('HYDRA_BENCH_MIGRATION_FAILED', `${what}: migration ${info.status}: ${info['error-desc'] ?? ''}`);
    if (performance.now() > deadline) throw new BenchError('HYDRA_BENCH_MIGRATION_FAILED', `${what}: migration not completed within ${timeoutMs / 1000} s`);
    await sleep(10);
  }
}

/** Bytes of `file` resident in the page cache, by util-linux fincore (null if it is not installed). */
export function residentBytes(file: string): number | null {
  try {
    const out = execFileSync('fincore', ['--bytes', '--noheadings', '--output', 'RES', file], { encoding: 'utf8' }).trim();
    return Number(out);
  } catch {
    // fincore missing or failing: the sample says "not verified" instead of guessing.
    return null;
  }
}

/** Drop clean page-cache pages machine-wide (needs root), after writing dirty ones back. */
export function dropCaches(): void {
  execFileSync('sync');
  fs.writeFileSync('/proc/sys/vm/drop_caches', '3\n');
}

export const baselinePart: Part<BaselineSample> = {
  id: 'baseline',
  title: 'QEMU full save/restore (fully populated guest)',
  plan: (o) => ({ samples: o.baselineSizesGb.length * o.baselineRepeats * 2, estimateS: 10, weights: o.baselineSizesGb.flatMap((g) => Array<number>(o.baselineRepeats * 2).fill(1 + 2 * g)) }),
  async run({ opts, progress }) {
    const samples: BaselineSample[] = [];
    // An isolated home for the VMs and the saved files (its store is not used).
    const env = await benchEnv('eval-baseline');
    try {
    for (const sizeGb of opts.baselineSizesGb) {
      const memoryMb = Math.round(sizeGb * 1024);
      const workingSetMb = fullWorkingSetMb(memoryMb);
      const name = `eval-qemu-${memoryMb}`;
      const saveFile = path.join(env.home, `eval-qemu-save-${memoryMb}.bin`);
      let child: ChildProcess | undefined;
      const killChild = async () => {
        const c = child;
        if (c && c.exitCode === null && c.signalCode === null) {
          c.kill('SIGKILL');
          await new Promise((r) => c.once('exit', r));
        }
      };
      try {
        progress.log(`${sizeGb} GB guest: booting, memcheck fills ${workingSetMb} MB`);
        const { spec } = await bootMemcheck({ name, memoryMb, workingSetMb, rateMb: 32 });
        const paths = vmPaths(name);
        const qmp = await connectWhenReady(paths.qmpSocket, { label: `VM ${name}` });
        await qmp.execute('stop');
        const tSave = performance.now();
        await qmp.execute('migrate', { uri: `file:${saveFile}` });
        await waitMigration(qmp, `${name} save`, 600_000);
        const saveMs = performance.now() - tSave;
        qmp.close();
        const fileMb = fs.statSync(saveFile).size / 2 ** 20;
        await stopVm(name);
        // The same arguments as the primary, incoming; QEMU's own stream carries the configuration section.
        // No console input FIFO: QEMU's open of it for reading would wait for a writer, which only a VM's supervisor provides.
        const args = buildQemuArgs(spec, { ...paths, serialIn: undefined }, { accel: chooseAccel(spec.accel, name), incomingDefer: true });
        const gi = args.indexOf('migration.send-configuration=off');
        if (gi > 0) args.splice(gi - 1, 2);
        for (let repeat = 1; repeat <= opts.baselineRepeats; repeat++) {
          for (const cache of ['cold', 'warm'] as const) {
            progress.startSample(`${sizeGb} GB full restore ${repeat}/${opts.baselineRepeats}, ${cache} cache`);
            if (cache === 'cold') dropCaches();
            else execFileSync('cat', [saveFile], { stdio: ['ignore', 'ignore', 'ignore'] });
            const resident = residentBytes(saveFile);
            removeStaleSockets(name);
            const logFd = fs.openSync(paths.qemuLog, 'a');
            const tSpawn = performance.now();
            const c = spawn(findQemu(), args, { stdio: ['ignore', logFd, logFd], env: { ...process.env, LD_PRELOAD: shimPath } });
            child = c;
            fs.closeSync(logFd);
            const q2 = await connectWhenReady(paths.hydraQmpSocket, { label: `VM ${name} (full restore)`, deadlineMs: 30_000, isAlive: () => c.exitCode === null && c.signalCode === null });
            const spawnMs = performance.now() - tSpawn;
            const tLoad = performance.now();
            await q2.execute('migrate-incoming', { uri: `file:${saveFile}` });
            await waitMigration(q2, `${name} load`, 600_000);
            const loadMs = performance.now() - tLoad;
            await q2.execute('cont');
            const spawnToRunningMs = performance.now() - tSpawn;
            q2.close();
            await killChild();
            const residentMbBefore = resident === null ? null : resident / 2 ** 20;
            const s: BaselineSample = {
              sizeGb, memoryMb, workingSetMb, cache, repeat, saveMs, fileMb, residentMbBefore,
              coldVerified: cache === 'cold' && residentMbBefore !== null ? residentMbBefore <= fileMb * 0.01 : null,
              spawnMs, loadMs, spawnToRunningMs,
            };
            samples.push(s);
            progress.endSample(`spawn→running ${spawnToRunningMs.toFixed(0)} ms (load ${loadMs.toFixed(0)} ms), ${residentMbBefore?.toFixed(1) ?? '?'} of ${fileMb.toFixed(0)} MB cached before`);
          }
        }
      } finally {
        await killChild();
        await stopQuietly(name);
        removeStaleSockets(name);
        fs.rmSync(saveFile, { force: true });
      }
    }
    } finally {
      await env.close();
    }
    return { config: { sizesGb: opts.baselineSizesGb, repeats: opts.baselineRepeats, guest: 'memcheck over all RAM but 8 % + 112 MB', cold: 'sync; echo 3 > /proc/sys/vm/drop_caches; fincore shows <= 1 % of the file cached', warm: 'file read with cat first' }, samples };
  },
};
