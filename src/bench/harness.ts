import fs from 'node:fs';
import { BenchError } from '../errors.js';
import { sleep as sleepMs } from '../util/sleep.js';
import path from 'node:path';
import { spawnStore, type StoreProcess } from '../store/index.js';
import { quantile } from '../checkpoint/index.js';

/** Shared pieces of the benchmarks: an isolated HydraVM home, a store process, stats. */
export interface BenchEnv {
  home: string;
  storeDir: string;
  store: StoreProcess;
  close(): Promise<void>;
}

export async function benchEnv(prefix: string): Promise<BenchEnv> {
  const home = fs.mkdtempSync(path.join('/tmp', `hv-bench-${prefix}-`));
  process.env.HYDRAVM_HOME = home;
  process.env.HYDRAVM_SECRET ??= 'bench-secret-0123456789abcdef';
  const storeDir = path.join(home, 'store');
  const store = await spawnStore({ dir: storeDir, env: process.env, logFile: path.join(home, 'store.log') });
  return {
    home,
    storeDir,
    store,
    async close() {
      await store.stop();
      // HYDRAVM_BENCH_KEEP=1 keeps the logs, serial consoles and store of a run to look into.
      if (process.env.HYDRAVM_BENCH_KEEP === '1') process.stderr.write(`bench: kept ${home}\n`);
      else fs.rmSync(home, { recursive: true, force: true });
    },
  };
}

export interface Summary {
  n: number;
  median: number | null;
  p99: number | null;
  min: number | null;
  max: number | null;
}

export function summary(values: number[]): Summary {
  return {
    n: values.length,
    median: quantile(values, 0.5),
    p99: quantile(values, 0.99),
    min: values.length ? Math.min(...values) : null,
    max: values.length ? Math.max(...values) : null,
  };
}

export const fmt = (v: number | null | undefined, digits = 1) => (v === null || v === undefined ? '-' : v.toFixed(digits));

export function writeResults(outDir: string, name: string, json: unknown, markdown: string, charts: Record<string, string>): string[] {
  fs.mkdirSync(outDir, { recursive: true });
  const files = [path.join(outDir, `${name}.json`), path.join(outDir, `${name}.md`)];
  fs.writeFileSync(files[0]!, JSON.stringify(json, null, 2) + '\n');
  fs.writeFileSync(files[1]!, markdown);
  for (const [file, svg] of Object.entries(charts)) {
    const p = path.join(outDir, file);
    fs.writeFileSync(p, svg);
    files.push(p);
  }
  return files;
}

export { sleep } from '../util/sleep.js';

/** Poll `pred` every `pollMs` until it holds (returns performance.now() then) or `timeoutMs` passes. */
export async function waitFor(what: string, pred: () => boolean, timeoutMs: number, pollMs = 20): Promise<number> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    if (pred()) return performance.now();
    if (performance.now() > deadline) throw new BenchError('HYDRA_BENCH_TIMEOUT', `timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleepMs(pollMs);
  }
}
