// Protection of a running VM: the detached checkpointer that sends incremental checkpoints to the store (the front door of src/checkpoint).
import { onStop } from '../vm/index.js';
import { isProtected, unprotectVm } from './protection.js';

export { protectVm, unprotectVm, readProtection, readCheckpointHistory, isProtected, assertProtectable, runCheckpointerProcess, type ProtectRequest, type StoreDiscovery, type StoreResolverFactory } from './protection.js';
export { nextGeneration } from './generation.js';
export { collectStatus, renderPrometheus, type StatusRow } from './status-report.js';
export { quantile, summarize, type CheckpointStats, type ProtectionStatus } from './stats.js';

// A protected VM that is stopped ends its protection first, so disk layers are merged back while QEMU still runs.
onStop(async (vm) => {
  if (isProtected(vm)) await unprotectVm(vm, 120_000);
});
export { COW_PRIVATE_RAM_REASON } from './cow-mode.js';
