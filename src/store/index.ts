/**
 * The checkpoint store: daemon, on-disk image/journal/meta formats, offline access.
 * Formats: docs/formats.md.
 */
export { startStoreServer, parseAddress, type StoreServer, type StoreServerOptions } from './server.js';
export { openVmImage, listVms, dropGeneration, fenceGeneration, type OpenedImage } from './offline.js';
export { Store, type VmSummary } from './store.js';
export { GenerationImage, type StableImage } from './generation-image.js';
export type { CommitResult as StoreCommitResult } from './checkpoint.js';
export { storeMetrics, storeRegistry, type StoreMetrics } from './metrics.js';
export { CRASH_POINTS, FaultInjector, type CrashPoint } from './faults.js';
export { spawnStore, type StoreProcess } from './spawn.js';
export { DirLock, holder as lockHolder } from './dir-lock.js';
export { fileDataRuns } from './data-runs.js';
export type { StoreMeta } from '../protocol/index.js';
