// userfaultfd on a QEMU process's guest RAM: dirty-page tracking (write-protect + PAGEMAP_SCAN) and missing-page filling (the front door of src/tracker).
export { DirtyTracker, populatedRunsOf, unionRuns } from './dirty-tracker.js';
export { warmFileRuns, dropFileCache, fileDataRunsOf } from './file-cache.js';
export type { DirtyRun, DirtyTrackerOptions, CollectStats } from './dirty-tracker.js';
export { findGuestRam, parseMaps, readMaps, sharedFileMappings, privateFileMappings, processStartTime } from './guest-ram.js';
export type { GuestRamKind, GuestRamMapping, GuestRamSelector, MapsEntry } from './guest-ram.js';
export { listUffds, takeUffd, UFFD_FEATURE_INITIALIZED } from './uffd.js';
export type { UffdInProcess, TakenUffd } from './uffd.js';
export { MissingPageHandler, type FillResult, type MissingPageHandlerOptions } from './page-fault-handler.js';
export { UffdSession } from './uffd-session.js';
export { CowTracker, releaseOrphanedCow, COW_MIN_GRAIN, COW_MAX_GRAIN } from './cow-tracker.js';
export type { CowTrackerOptions, CowBatch, CowCollectResult, CowStats } from './cow-tracker.js';
