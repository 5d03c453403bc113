/**
 * Offline access to a store directory (no daemon connection): what a
 * file-mode restore uses. If a live store daemon owns the directory
 * (DIR/store.lock), nothing is written: meta.json is read as is once no
 * checkpoint is being applied. Otherwise the generation is recovered first
 * (journal replayed or discarded), exactly as the daemon would on start.
 *
 * The caller must make sure nothing checkpoints into the generation while a
 * restored VM maps its image: fence it first (a newer generation registered).
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createHash } from 'node:crypto';
import { StoreError } from '../errors.js';
import type { StoreMeta } from '../protocol/index.js';
import { liveStores } from './server.js';
import { pidAlive } from '../util/pid.js';
import { Store, type VmSummary } from './store.js';

export interface OpenedImage {
  vm: string;
  generation: number;
  /** The raw RAM file to map (memory-backend-file,mem-path=...,share=off). */
  memoryPath: string;
  /** The committed device state, for migrate-incoming "file:PATH". */
  devstatePath: string;
  meta: StoreMeta;
}

async function daemonOwns(dir: string): Promise<boolean> {
  try {
    const [pidText, host] = (await fs.readFile(path.join(dir, 'store.lock'), 'utf8')).trim().split(/\s+/);
    const pid = Number(pidText);
    return pid !== process.pid && host === os.hostname() && pidAlive(pid);
  } catch {
    return false;
  }
}

async function storeFor(dir: string): Promise<Store> {
  const abs = path.resolve(dir);
  const live = liveStores.get(abs);
  if (live) return live;
  try {
    await fs.access(abs);
  } catch {
    throw new StoreError('HYDRA_STORE_NO_DIR', `store directory ${abs} does not exist`);
  }
  return Store.open(abs, { readOnly: await daemonOwns(abs) });
}

/**
 * The committed image of `vm` (newest generation with one, or `generation`),
 * consistent and verified (device state size + sha256).
 */
export async function openVmImage(dir: string, vm: string, generation?: number): Promise<OpenedImage> {
  const store = await storeFor(dir);
  const g = generation ?? (await store.latestCommittedGeneration(vm));
  if (g === null) throw new StoreError('HYDRA_STORE_NO_IMAGE', `VM ${vm} has no committed image in ${store.dir}`);
  const gs = await store.gen(vm, g);
  return gs.withStableImage(async (img) => {
    const buf = await fs.readFile(img.devstatePath).catch((err) => {
      throw new StoreError('HYDRA_STORE_DEVSTATE_CORRUPT', `read ${img.devstatePath}: ${(err as Error).message}`, { cause: err });
    });
    const sha = createHash('sha256').update(buf).digest('hex');
    if (buf.length !== img.meta.devstate.size || sha !== img.meta.devstate.sha256) {
      throw new StoreError('HYDRA_STORE_DEVSTATE_CORRUPT', `${img.devstatePath}: ${buf.length} bytes sha256 ${sha}, meta says ${img.meta.devstate.size} / ${img.meta.devstate.sha256}`);
    }
    const st = await fs.stat(img.memoryPath).catch((err) => {
      throw new StoreError('HYDRA_STORE_IMAGE_MISSING', `stat ${img.memoryPath}: ${(err as Error).message}`, { cause: err });
    });
    if (st.size !== img.meta.ramSize) {
      throw new StoreError('HYDRA_STORE_IMAGE_CORRUPT', `${img.memoryPath} is ${st.size} bytes, meta says RAM is ${img.meta.ramSize}`);
    }
    return { vm, generation: g, memoryPath: img.memoryPath, devstatePath: img.devstatePath, meta: img.meta };
  });
}

/** Every VM in the store directory with its generations and committed epochs. */
export async function listVms(dir: string): Promise<VmSummary[]> {
  return (await storeFor(dir)).listVms();
}

/** Delete a generation (its image is no longer needed by any restore). */
export async function dropGeneration(dir: string, vm: string, generation: number): Promise<void> {
  const store = await storeFor(dir);
  if (store.readOnly) throw new StoreError('HYDRA_STORE_DIR_BUSY', `store directory ${store.dir} is owned by a running store daemon; drop generations through it`);
  await store.dropGeneration(vm, generation);
}

/** Register `generation` for `vm` (fences older incarnations: their BEGIN/COMMIT are refused from now on). */
export async function fenceGeneration(dir: string, vm: string, generation: number): Promise<void> {
  const store = await storeFor(dir);
  if (store.readOnly) {
    // The daemon re-reads fence.json at every BEGIN and COMMIT, so writing it here is safe.
    const rw = await Store.open(store.dir);
    await rw.registerGeneration(vm, generation);
    return;
  }
  await store.registerGeneration(vm, generation);
}
