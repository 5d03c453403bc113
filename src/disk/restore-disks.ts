import fs from 'node:fs/promises';
import path from 'node:path';
import { DiskError } from '../errors.js';
import { parseLayerId, type LayerRef } from './layer-id.js';
import { removePin, writePin } from './pins.js';
import { fsyncFileAndDir, isNoSpace, qemuImg, type ImageInfo } from './qemu-img.js';

export interface RestoreDisksOptions {
  vm: string;
  /** Where the fresh overlays go (shared storage if the restored VM is to be protected again). */
  overlayDir: string;
  /**
   * Pin the frozen layers so a still-running primary's merges never change
   * them (restore drills). Release with releaseRestoreDisks() when the
   * restored VM is gone or protected anew. Default false: after a fail-over
   * the primary is dead and fenced, nothing merges.
   */
  pin?: boolean;
  /** Run `qemu-img check` on every layer of the chain (default: only the frozen layer; info checks the rest). */
  checkWholeChain?: boolean;
}

function missing(vm: string, ref: LayerRef, file: string, why: string): DiskError {
  const what = file === ref.layer ? `frozen layer ${file}` : `backing file ${file} of frozen layer ${ref.layer}`;
  return new DiskError('HYDRA_DISK_LAYER_MISSING', `VM ${vm}: disk ${ref.disk}${ref.epoch !== null ? ` (epoch ${ref.epoch})` : ''}: ${what} is missing (${why}); cannot restore this disk state`);
}

function corrupt(vm: string, ref: LayerRef, file: string, why: string): DiskError {
  return new DiskError('HYDRA_DISK_LAYER_CORRUPT', `VM ${vm}: disk ${ref.disk}${ref.epoch !== null ? ` (epoch ${ref.epoch})` : ''}: layer ${file} is corrupt (${why}); refusing to restore onto it`);
}

async function exists(file: string): Promise<boolean> {
  try {
    await fs.access(file);
    return true;
  } catch {
    return false;
  }
}

/** Validate the chain of one frozen layer; returns its virtual size. */
async function validateChain(vm: string, ref: LayerRef, checkAll: boolean): Promise<number> {
  if (!(await exists(ref.layer))) throw missing(vm, ref, ref.layer, 'no such file');
  const r = await qemuImg(['info', '-U', '--backing-chain', '--output=json', ref.layer]);
  if (r.code !== 0) {
    const m = /Could not open (?:backing file )?'([^']+)'[^:]*: (?:Could not open '[^']+': )?No such file or directory/.exec(r.stderr)
      ?? /Could not open '([^']+)': No such file or directory/.exec(r.stderr);
    if (m) throw missing(vm, ref, m[1]!, r.stderr);
    throw corrupt(vm, ref, ref.layer, `qemu-img info: ${r.stderr}`);
  }
  let chain: ImageInfo[];
  try {
    chain = JSON.parse(r.stdout) as ImageInfo[];
  } catch {
    throw corrupt(vm, ref, ref.layer, 'qemu-img info printed no JSON');
  }
  const top = chain[0];
  if (!top || top.format !== 'qcow2') throw corrupt(vm, ref, ref.layer, `format is ${top?.format ?? 'unknown'}, expected qcow2`);
  for (const img of chain) {
    if (img['format-specific']?.data?.corrupt) throw corrupt(vm, ref, img.filename, 'qcow2 corrupt flag is set');
  }
  const toCheck = checkAll ? chain.filter((c) => c.format === 'qcow2').map((c) => c.filename) : [ref.layer];
  for (const file of toCheck) {
    // Exit 0: clean; 3: only leaked clusters (harmless, space only); 2: corruptions; 1/63: check failed.
    const c = await qemuImg(['check', '-U', '-q', file]);
    if (c.code !== 0 && c.code !== 3) throw corrupt(vm, ref, file, `qemu-img check exit ${c.code}: ${c.stderr || 'errors found'}`);
  }
  return top['virtual-size'];
}

/**
 * Restore side: for each disk of a committed epoch, a fresh overlay on exactly
 * its frozen layer (`qemu-img create -f qcow2 -b FROZEN -F qcow2 OVERLAY`).
 * Returns the overlay files in device order (disk 0 first), to open in the
 * same device positions as the primary (buildQemuArgs `diskFiles`). The
 * failed primary's newer layers are never opened: the overlay's chain goes
 * down from the frozen layer only.
 */
export async function prepareRestoreDisks(layerIds: string[], opts: RestoreDisksOptions): Promise<string[]> {
  return (await prepareRestoreDiskSet(layerIds, opts)).files;
}

/** prepareRestoreDisks, also returning each disk's virtual size (a restore shell must match them). */
export async function prepareRestoreDiskSet(layerIds: string[], opts: RestoreDisksOptions): Promise<{ files: string[]; sizes: number[] }> {
  const refs = layerIds.map(parseLayerId).sort((a, b) => a.disk - b.disk);
  refs.forEach((r, i) => {
    if (r.disk !== i) throw new DiskError('HYDRA_DISK_LAYER_ID_INVALID', `VM ${opts.vm}: disk layer ids name disks ${refs.map((x) => x.disk).join(',')}, expected 0..${refs.length - 1}`);
  });
  const sizes: number[] = [];
  for (const ref of refs) sizes.push(await validateChain(opts.vm, ref, opts.checkWholeChain ?? false));

  await fs.mkdir(opts.overlayDir, { recursive: true });
  const stamp = `${Date.now().toString(36)}${Math.floor(Math.random() * 1296).toString(36)}`;
  const overlays: string[] = [];
  try {
    for (const ref of refs) {
      const overlay = path.join(path.resolve(opts.overlayDir), `${opts.vm}-disk${ref.disk}-r${stamp}.qcow2`);
      // -u with the size: the chain was just validated, and -u needs no lock on a file a stale primary may hold.
      const r = await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', ref.layer, '-F', 'qcow2', overlay, String(sizes[ref.disk])]);
      if (r.code !== 0) {
        await fs.rm(overlay, { force: true });
        throw new DiskError(isNoSpace(r.stderr) ? 'HYDRA_DISK_NO_SPACE' : 'HYDRA_DISK_RESTORE_FAILED', `VM ${opts.vm}: creating restore overlay ${overlay} failed: ${r.stderr}`);
      }
      await fsyncFileAndDir(overlay);
      overlays.push(overlay);
    }
    if (opts.pin) await writePin(path.dirname(refs[0]!.layer), refs.map((r) => r.layer), overlays);
  } catch (err) {
    for (const o of overlays) await fs.rm(o, { force: true });
    throw err;
  }
  return { files: overlays, sizes };
}

/** Release the pin a prepareRestoreDisks({pin: true}) wrote (the overlays themselves are left alone). */
export async function releaseRestoreDisks(layerIds: string[], overlays: string[]): Promise<void> {
  if (layerIds.length === 0) return;
  const first = parseLayerId(layerIds[0]!);
  await removePin(path.dirname(first.layer), overlays);
}
