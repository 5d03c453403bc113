// Checks on everything a restore reads from the store before any of it reaches QEMU, a path or a file.
/**
 * Whoever can write a store directory, or answer as a store, writes the image
 * meta a restore starts from: the spec inside it names files that are opened,
 * the VM name goes into paths, disk layer ids become overlay files. So the
 * meta is treated as input: the spec goes through validateSpec again (with its
 * name equal to the VM being restored), sizes, epochs and generations must be
 * in range and agree, and every disk layer must lie in the VM's layer
 * directory. A failure names the VM and the field and leaves nothing behind:
 * these checks run before anything is created.
 */
import path from 'node:path';
import { RestoreError, SpecError } from '../errors.js';
import type { StoreMeta } from '../protocol/index.js';
import { validateSpec, checkSpecFiles, type VmSpec, type LaunchFile } from '../vm/index.js';
import { parseLayerId } from '../disk/index.js';

const U32 = 0xffffffff;
const PAGE = 4096;
/** Largest guest RAM a restore accepts (1 TiB): far above any VM here, far below what would overflow offsets. */
export const MAX_RAM_BYTES = 2 ** 40;
/** Largest device state accepted (QEMU's device state is kilobytes to a few MiB without RAM). */
export const MAX_DEVSTATE_BYTES = 256 * 1024 * 1024;

export interface ValidatedImage {
  /** The spec re-validated from the image, safe to start QEMU from. */
  spec: VmSpec;
  /** The launch options kept from the image (only the fields a restore uses). */
  layerDir: string | undefined;
  /** The layer directory every disk layer of the epoch lies in (`<layerDir>/<vm>`), if the epoch has disks. */
  vmLayers: string | undefined;
  /** Whether the recorded launch puts the NICs behind root ports (the restored QEMU must do the same). */
  nicPorts: boolean;
}

export interface ExpectedImage {
  vm: string;
  /** The generation asked for, if any. */
  generation?: number;
  /** The new incarnation's generation, which must be above the image's. */
  newGeneration: number;
}

function isCleanAbsolute(p: unknown): p is string {
  return typeof p === 'string' && p.length > 0 && p.length < 4096 && path.isAbsolute(p) && path.normalize(p) === p && !p.includes('\0');
}

/** Validate the meta of the image a restore is about to start from. Throws RestoreError HYDRA_RESTORE_BAD_IMAGE naming the field. */
export function validateImage(meta: StoreMeta, want: ExpectedImage): ValidatedImage {
  const vm = want.vm;
  const bad = (field: string, why: string) => new RestoreError('HYDRA_RESTORE_BAD_IMAGE', `VM "${vm}": the image's ${field} ${why}; refusing to restore from it`);
  if (meta.vm !== vm) throw bad('meta.vm', `is ${JSON.stringify(meta.vm)}, not the VM being restored`);
  if (!Number.isInteger(meta.generation) || meta.generation < 1 || meta.generation > U32) throw bad('meta.generation', `${meta.generation} is outside 1..${U32}`);
  if (want.generation !== undefined && meta.generation !== want.generation) throw bad('meta.generation', `is ${meta.generation}, generation ${want.generation} was asked for`);
  if (meta.generation >= want.newGeneration) throw bad('meta.generation', `${meta.generation} is not below the new incarnation's ${want.newGeneration}`);
  if (!Number.isInteger(meta.committedEpoch) || meta.committedEpoch < 1 || meta.committedEpoch > U32) throw bad('meta.committedEpoch', `${meta.committedEpoch} is outside 1..${U32}`);
  if (meta.pageSize !== PAGE) throw bad('meta.pageSize', `${meta.pageSize} is not ${PAGE}`);
  if (!Number.isSafeInteger(meta.ramSize) || meta.ramSize <= 0 || meta.ramSize % PAGE !== 0 || meta.ramSize > MAX_RAM_BYTES) {
    throw bad('meta.ramSize', `${meta.ramSize} is not a positive multiple of ${PAGE} up to ${MAX_RAM_BYTES}`);
  }
  if (!Number.isInteger(meta.devstate.size) || meta.devstate.size <= 0 || meta.devstate.size > MAX_DEVSTATE_BYTES) {
    throw bad('meta.devstate.size', `${meta.devstate.size} is outside 1..${MAX_DEVSTATE_BYTES}`);
  }

  const launchFile = meta.config as Partial<LaunchFile> | null;
  if (!launchFile || typeof launchFile !== 'object' || !launchFile.spec || typeof launchFile.spec !== 'object' || !launchFile.launch || typeof launchFile.launch !== 'object') {
    throw new RestoreError('HYDRA_RESTORE_BAD_CONFIG', `VM "${vm}": the image of generation ${meta.generation} carries no VM configuration`);
  }
  // The stored spec is the normalised form; turn it back into spec-file fields and validate it like user input.
  const s = launchFile.spec as unknown as Record<string, unknown>;
  const raw = {
    name: s.name,
    memory: s.memoryBytes,
    vcpus: s.vcpus,
    accel: s.accel,
    kernel: s.kernel,
    ...(s.initrd !== undefined ? { initrd: s.initrd } : {}),
    cmdline: s.cmdline,
    // No size: a restore never creates a disk the image names.
    disks: Array.isArray(s.disks) ? s.disks.map((d: { path?: unknown }) => ({ path: d?.path })) : s.disks,
    ...(s.nics !== undefined ? { nics: s.nics } : {}),
    ...(s.protection && typeof s.protection === 'object'
      ? { protection: { cow: (s.protection as { cow?: unknown }).cow, ...((s.protection as { grainBytes?: unknown }).grainBytes !== undefined ? { grain: (s.protection as { grainBytes?: unknown }).grainBytes } : {}) } }
      : {}),
  };
  let spec: VmSpec;
  try {
    spec = validateSpec(raw, '/', `VM "${vm}": the image's spec`);
  } catch (err) {
    if (err instanceof SpecError) throw new RestoreError('HYDRA_RESTORE_BAD_IMAGE', `${err.message}; refusing to restore from it`, { cause: err });
    throw err;
  }
  // The root disk is disks[0] either way; only how QEMU is told to boot from it depends on this flag.
  if (s.hasRoot === true) spec.hasRoot = true;
  if (spec.name !== vm) throw bad('spec.name', `is ${JSON.stringify(spec.name)}, not the VM being restored`);
  if (spec.memoryBytes !== meta.ramSize) throw bad('spec.memory', `(${spec.memoryBytes} bytes) does not match the image's RAM size ${meta.ramSize}`);
  for (const [field, p] of [['spec.kernel', spec.kernel], ['spec.initrd', spec.initrd]] as const) {
    if (p !== undefined && !isCleanAbsolute(p)) throw bad(field, `${JSON.stringify(p)} is not a clean absolute path`);
  }
  spec.disks.forEach((d, i) => {
    if (!isCleanAbsolute(d.path)) throw bad(`spec.disks.${i}.path`, `${JSON.stringify(d.path)} is not a clean absolute path`);
  });
  try {
    // The epoch's disk layers stand in for the spec's disks when it has them (checked below).
    checkSpecFiles({ ...spec, disks: meta.disks.length > 0 ? [] : spec.disks });
  } catch (err) {
    throw new RestoreError('HYDRA_RESTORE_BAD_IMAGE', `${(err as Error).message}; refusing to restore from it`, { cause: err });
  }

  const layerDir = launchFile.launch.layerDir;
  if (layerDir !== undefined && !isCleanAbsolute(layerDir)) throw bad('launch.layerDir', `${JSON.stringify(layerDir)} is not a clean absolute path`);
  let vmLayers: string | undefined;
  if (meta.disks.length > 0) {
    if (meta.disks.length !== spec.disks.length) throw bad('meta.disks', `name ${meta.disks.length} disks, the spec has ${spec.disks.length}`);
    meta.disks.forEach((id, i) => {
      let layer: string;
      try {
        layer = parseLayerId(id).layer;
      } catch (err) {
        throw bad(`meta.disks.${i}`, `is not a layer id (${(err as Error).message})`);
      }
      const dir = path.dirname(layer);
      // Layers live in <layer root>/<vm>/; restore overlays are created beside them.
      if (!isCleanAbsolute(layer) || !/^[A-Za-z0-9._-]+\.qcow2$/.test(path.basename(layer)) || path.basename(dir) !== vm) {
        throw bad(`meta.disks.${i}`, `layer ${JSON.stringify(layer)} is not a qcow2 file in a layer directory of VM ${vm} (<root>/${vm}/<name>.qcow2)`);
      }
      if (vmLayers === undefined) vmLayers = dir;
      else if (dir !== vmLayers) throw bad(`meta.disks.${i}`, `layer ${layer} is not in ${vmLayers} with the other layers`);
      if (layerDir !== undefined && path.dirname(dir) !== layerDir) throw bad(`meta.disks.${i}`, `layer ${layer} is outside the VM's layer root ${layerDir}`);
    });
  }
  return { spec, layerDir, vmLayers, nicPorts: launchFile.launch.nicPorts === true };
}
