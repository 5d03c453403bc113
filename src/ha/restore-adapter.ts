import { HaError } from './errors.js';
import type { RestoreMode } from './cluster.js';

/**
 * The agent's only contact with restore and protection. The real functions
 * are loaded lazily (src/restore may be absent while the HA layer is tested),
 * and tests inject their own. Both act on the process's HYDRAVM_HOME.
 */
export interface RestoreRequest {
  vm: string;
  store: string;
  secret: string;
  mode: RestoreMode;
  storeDir?: string;
  /** Image generation to load (default: newest). */
  generation?: number;
  /** Generation the restored VM runs (and is protected) at. */
  newGeneration: number;
  protect?: { intervalMs: number };
}

export interface RestoreOutcome {
  vm: string;
  generation: number;
  epoch?: number;
  timings?: { spawnToRunningMs?: number; totalMs?: number; [k: string]: number | undefined };
  /** Network mode: memory still streaming; protection must wait for it. */
  pager?: { done: Promise<unknown> };
}

export type RestoreFn = (req: RestoreRequest) => Promise<RestoreOutcome>;

export interface ProtectRequest {
  vm: string;
  store: string;
  intervalMs: number;
  generation: number;
  secretFile?: string;
  /** Copy-on-write checkpoints (grain in bytes); absent: as the VM's spec says. */
  cow?: { grain?: number };
}

export type ProtectFn = (req: ProtectRequest) => Promise<{ generation: number; committedEpoch?: number }>;

/** The highest generation the store has seen for the VM, plus one (undefined if unknown). */
export type StoreGenerationFn = (vm: string, store: string, secretFile?: string) => Promise<number | undefined>;

async function load<T>(rel: string, what: string): Promise<T> {
  try {
    return (await import(new URL(rel, import.meta.url).href)) as T;
  } catch (err) {
    throw new HaError('HYDRA_HA_NO_RESTORE', `${what} is not available (${rel}): ${(err as Error).message}`, { cause: err });
  }
}

export const defaultRestore: RestoreFn = async (req) => {
  const mod = await load<{ restoreVm?: RestoreFn }>('../restore/index.js', 'restore');
  if (typeof mod.restoreVm !== 'function') throw new HaError('HYDRA_HA_NO_RESTORE', 'src/restore does not export restoreVm');
  return mod.restoreVm(req);
};

export const defaultProtect: ProtectFn = async (req) => {
  const mod = await load<{ protectVm: (r: ProtectRequest) => Promise<{ generation: number; committedEpoch?: number }> }>('../checkpoint/protection.js', 'protection');
  return mod.protectVm(req);
};

export const defaultStoreGeneration: StoreGenerationFn = async (vm, store, secretFile) => {
  try {
    const mod = await load<{ nextGeneration: (vm: string, store: string, secretFile?: string) => Promise<number> }>('../checkpoint/generation.js', 'generation lookup');
    return await mod.nextGeneration(vm, store, secretFile);
  } catch {
    return undefined;
  }
};
