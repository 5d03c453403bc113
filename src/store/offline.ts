/**
 * Offline access to a store directory (no daemon connection): what a
 * file-mode restore uses. The directory's flock (DIR/store.lock) decides:
 *  - free: no store serves it; this process takes it exclusively for the
 *    call, recovers the generation first (journal replayed or discarded)
 *    exactly as the daemon would on start, then reads;
 *  - held exclusively (a store daemon, on any host sharing the directory):
 *    nothing is written; meta.json is read as is once no checkpoint is being
 *    applied;
 *  - held shared (other offline readers): read-only, under a shared lock, so
 *    no store starts writing meanwhile.
 * The lock is released when the call returns: a restored VM maps an image
 * that its fence keeps frozen, not the lock.
 *
 * The caller must make sure nothing checkpoints into the generation while a
 * restored VM maps its image: fence it first (a newer generation registered).
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { createHash } from 'node:crypto';
import { StoreError } from '../errors.js';
import type { StoreMeta } from '../protocol/index.js';
import { liveStores } from './server.js';
import { DirLock } from './dir-lock.js';
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

/** Run `fn` with the store serving `dir`: the live one in this process, or one opened for the call (see above). */
async function withStore<T>(dir: string, fn: (store: Store) => Promise<T>): Promise<T> {
  const abs = path.resolve(dir);
  const live = liveStores.get(abs);
  if (live) return fn(live);
  try {
    await fs.access(abs);
  } catch {
    throw new StoreError('HYDRA_STORE_NO_DIR', `store directory ${abs} does not exist`);
  }
  const ex = await DirLock.tryTake(abs, 'ex');
  const sh = ex ? null : await DirLock.tryTake(abs, 'sh');
  let store: Store;
  try {
    store = ex ? await Store.open(abs, { lock: ex }) : await Store.open(abs, { readOnly: true });
  } catch (err) {
    await ex?.release();
    await sh?.release();
    throw err;
  }
  try {
    return await fn(store);
  } finally {
    await store.close();
    await sh?.release();
  }
}

/**
 * The committed image of `vm` (newest generation with one, or `generation`),
 * consistent and verified (device state size + sha256).
 */
export async function openVmImage(dir: string, vm: string, generation?: number): Promise<OpenedImage> {
  return withStore(dir, (store) => openIn(store, vm, generation));
}

async function openIn(store: Store, vm: string, generation?: number): Promise<OpenedImage> {
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
  return withStore(dir, (store) => store.listVms());
}

/** Delete a generation (its image is no longer needed by any restore). */
export async function dropGeneration(dir: string, vm: string, generation: number): Promise<void> {
  await withStore(dir, async (store) => {
    if (store.readOnly) throw new StoreError('HYDRA_STORE_DIR_BUSY', `store directory ${store.dir} is served by another process (see ${path.join(store.dir, 'store.lock')}); drop generations through it`);
    await store.dropGeneration(vm, generation);
  });
}

/** Register `generation` for `vm` (fences older incarnations: their BEGIN/COMMIT are refused from now on). */
export async function fenceGeneration(dir: string, vm: string, generation: number): Promise<void> {
  await withStore(dir, async (store) => {
    // Writing fence.json beside a live store would race its commits: only the store that serves the directory fences.
    if (store.readOnly) throw new StoreError('HYDRA_STORE_DIR_BUSY', `store directory ${store.dir} is served by another process (see ${path.join(store.dir, 'store.lock')}); register the generation through it (connect as its checkpointer)`);
    await store.registerGeneration(vm, generation);
  });
}
