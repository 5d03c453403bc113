/** Disk state consistent with every checkpoint: see docs/disk.md. */
export { DiskFreezer, checkDiskFile, type DiskFreezerOptions, type DiskStatus, type MergeStats } from './freezer.js';
export { prepareRestoreDisks, prepareRestoreDiskSet, releaseRestoreDisks, type RestoreDisksOptions } from './restore-disks.js';
export { makeDiskHook, type DiskHook } from './hook.js';
export { encodeLayerId, parseLayerId, type LayerRef } from './layer-id.js';
export { DiskError } from '../errors.js';
