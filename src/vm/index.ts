// Local VMs: spec, QEMU under its own supervisor, runtime files, serial log (the front door of src/vm).
export { findQemu, startVm, stopVm, onStop, vmStatus, listVms, assertVmName, QEMU_BINARY, type StartOptions, type VmStatus, type StopHook } from './manager.js';
export { vmPaths, readState, writeState, isLive, listVmNames, removeStaleSockets, qemuIdentity, supervisorIdentity, type VmPaths, type VmLifecycle, type VmState } from './runtime.js';
export { parseSize, parseGrain, validateSpec, loadSpecFile, checkSpecFiles, nameSchema, defaultTapName, type DiskSpec, type NicSpec, type VmSpec } from './spec.js';
export { writeCowGuard, clearCowGuard } from './cow-guard.js';
export { writePauseGuard, clearPauseGuard } from './pause-guard.js';
export { checkNics, prepareNics, releaseNics, releaseRecordedNics } from './nics.js';
export { chooseAccel, kvmUsable, type Accel } from './accel.js';
export { buildQemuArgs, type QemuLaunchOptions, type QemuRuntimePaths, type RamBacking } from './qemu-args.js';
export { readSerial, lastMemcheckProgress, countViolations, waitForSerial, waitForMemcheckStep, requestFullVerify, fullVerifications, typeOnConsole, type MemcheckProgress, type FullVerify } from './serial.js';
export { monoNow, readWatchdogFeed, writeWatchdogFeed, starvedReason, guardWithWatchdog, type WatchdogFeed, type WatchdogGuard } from './watchdog.js';
export type { LaunchFile } from './supervisor.js';
export { killProcess, type ProcessIdentity } from '../native/index.js';
export { shellKey, shellConfigOf, localShellConfig, listShells, startShell, stopShellNow, removeShell, stopAllShells, adoptShell, idleShellsFor, type ShellConfig, type ShellInfo, type AdoptResult } from './shell.js';
export { shellPaths } from './runtime.js';
export { placeholderNode, nicDevices, nicPort, SHELL_THROTTLE_GROUP } from './qemu-args.js';
