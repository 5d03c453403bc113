// Local VMs: spec, QEMU under its own supervisor, runtime files, serial log (the front door of src/vm).
export { findQemu, startVm, stopVm, onStop, vmStatus, listVms, assertVmName, QEMU_BINARY, type StartOptions, type VmStatus, type StopHook } from './manager.js';
export { vmPaths, readState, writeState, isLive, listVmNames, removeStaleSockets, type VmPaths, type VmLifecycle, type VmState } from './runtime.js';
export { parseSize, validateSpec, loadSpecFile, checkSpecFiles, type DiskSpec, type VmSpec } from './spec.js';
export { chooseAccel, kvmUsable, type Accel } from './accel.js';
export { buildQemuArgs, type QemuLaunchOptions, type QemuRuntimePaths, type RamBacking } from './qemu-args.js';
export { readSerial, lastMemcheckProgress, countViolations, waitForSerial, waitForMemcheckStep, type MemcheckProgress } from './serial.js';
export type { LaunchFile } from './supervisor.js';
