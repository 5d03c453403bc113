export { restoreVm, type RestoreOptions, type RestoreResult, type RestoreTimings, type RestoreMode } from './restore.js';
export { NetworkPager, type PagerStats } from './network-pager.js';
export type { PagingOptions } from './pager-connect.js';
