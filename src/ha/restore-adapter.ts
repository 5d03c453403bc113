// The agent's only contact with restore and protection: the real functions, and the shapes a test may inject in their place.
import { nextGeneration, protectVm, type ProtectRequest, type ProtectionStatus } from '../checkpoint/index.js';
import { restoreVm, type NetworkPager, type RestoreOptions, type RestoreResult, type RestoreTimings } from '../restore/index.js';

export type { ProtectRequest } from '../checkpoint/index.js';

/** A restore the agent asks for: always at a new generation. Acts on the process's HYDRAVM_HOME. */
export type RestoreRequest = RestoreOptions & { newGeneration: number };

/** What the agent reads of a restore's result. */
export type RestoreOutcome = Pick<RestoreResult, 'vm' | 'generation'> & Partial<Pick<RestoreResult, 'epoch' | 'shell'>> & {
  timings?: Partial<RestoreTimings>;
  /** Network mode: memory still streaming; protection must wait for it. */
  pager?: Pick<NetworkPager, 'done'>;
};

export type RestoreFn = (req: RestoreRequest) => Promise<RestoreOutcome>;

export type ProtectFn = (req: ProtectRequest) => Promise<Pick<ProtectionStatus, 'generation'>>;

/** The highest generation the store has seen for the VM, plus one (undefined if unknown). */
export type StoreGenerationFn = (vm: string, store: string, secretFile?: string) => Promise<number | undefined>;

export const defaultRestore: RestoreFn = (req) => restoreVm(req);

export const defaultProtect: ProtectFn = (req) => protectVm(req);

export const defaultStoreGeneration: StoreGenerationFn = async (vm, store, secretFile) => {
  try {
    return await nextGeneration(vm, store, secretFile);
  } catch {
    // Unknown: etcd's counter alone decides; the store still fences any older generation.
    return undefined;
  }
};
