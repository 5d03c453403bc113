import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { RestoreError, HydraError } from '../errors.js';
import { protectVm } from '../checkpoint/index.js';
import { StoreClient, type StoreMeta } from '../protocol/index.js';
import { startVm, stopVm, vmPaths, readState, isLive, type LaunchFile, chooseAccel } from '../vm/index.js';
import { connectWhenReady, type QmpClient } from '../qmp/index.js';
import { vmLog } from '../util/log.js';
import { DEFAULT_STREAMS, NetworkPager, type PagerStats } from './network-pager.js';
import { DEFAULT_GUEST_DELAY, DEFAULT_MIN_BYTES_PER_S, pagerConnect, type PagingOptions } from './pager-connect.js';
import { validateImage } from './validate.js';
import { announceSelf, assertRestorableNics } from './nics.js';
import { sleep } from '../util/sleep.js';

export type RestoreMode = 'file' | 'network';

export interface RestoreOptions {
  vm: string;
  /** Store address host:port (both modes read metadata and, in network mode, pages from it). */
  store: string;
  secret: string;
  mode: RestoreMode;
  /** File mode: the store's directory as this host sees it (shared filesystem). */
  storeDir?: string;
  /** Image generation to restore; default: the newest the store holds. */
  generation?: number;
  /**
   * The new incarnation's generation (the image generation it will be protected
   * under). Registered at the store before anything is read, fencing every older
   * incarnation. Default: the highest generation the store knows plus one.
   */
  newGeneration?: number;
  /** Protect the restored VM again, under `newGeneration`. */
  protect?: { intervalMs: number; secretFile?: string };
  /**
   * Leave the guest paused once its device state is loaded (restore drills,
   * verification): memory is still fetched (network mode), the VM is not resumed.
   */
  paused?: boolean;
  /** Network mode: background prefetch (on by default). */
  prefetch?: boolean;
  /** Network mode: how guest memory is streamed, and where to turn when the store fails meanwhile. */
  paging?: PagingOptions;
  /** Disk overlays to open instead of the spec's disks (prepared from the checkpoint's frozen layers). */
  diskFiles?: string[];
  /** Progress lines (prefetch). */
  onProgress?: (msg: string) => void;
}

export interface RestoreTimings {
  /** Reading and checking the image metadata and device state. */
  prepareMs: number;
  /** QEMU spawned to QMP answering. */
  spawnMs: number;
  /** migrate-incoming of the device state until completed. */
  deviceLoadMs: number;
  /** QEMU process spawned until the guest runs again. */
  spawnToRunningMs: number;
  /** The restore's launch, including starting the VM's supervisor process, until the guest runs again. */
  launchToRunningMs: number;
  /** From the call to the guest running. */
  totalMs: number;
}

export interface RestoreResult {
  vm: string;
  mode: RestoreMode;
  generation: number;
  epoch: number;
  newGeneration: number;
  timings: RestoreTimings;
  /** Network mode: the pager keeps serving memory after this returns. */
  pager?: NetworkPager;
  /** Whether QMP announce-self was sent after `cont` (the VM has NICs). */
  announced: boolean;
}

/**
 * Slim restore (the paper's `hart`): start QEMU with the VM's recorded
 * configuration and `-incoming defer`, load only the device state of the
 * newest committed checkpoint, resume at once. Guest memory comes on demand:
 * from the image file mapped privately (file mode) or from the store through
 * userfaultfd (network mode).
 */
export async function restoreVm(opts: RestoreOptions, hooks: RestoreTestHooks = {}): Promise<RestoreResult> {
  const log = vmLog(opts.vm);
  const t0 = performance.now();
  const existing = readState(opts.vm);
  if (isLive(existing)) throw new RestoreError('HYDRA_RESTORE_VM_ALIVE', `VM "${opts.vm}" is still running on this host (QEMU pid ${existing!.qemuPid}); stop it before restoring`);

  const unreachable = (err: unknown) => new RestoreError('HYDRA_RESTORE_STORE_UNREACHABLE', `VM "${opts.vm}": cannot reach the store at ${opts.store}: ${(err as Error).message}`, { cause: err });
  // Fence first, before a single byte of the image is read: once generation g+1 is
  // registered the store refuses every commit of older incarnations and has waited
  // for the one in flight, so the epoch read below can no longer move.
  const newGeneration = opts.newGeneration ?? (await nextGenerationAt(opts).catch((err: unknown) => { throw unreachable(err); }));
  if (!Number.isInteger(newGeneration) || newGeneration < 1 || newGeneration > 0xffffffff) throw new RestoreError('HYDRA_RESTORE_BAD_ARGS', `VM "${opts.vm}": new generation ${newGeneration} is outside 1..${0xffffffff}`);
  const fence = await StoreClient.connect({ address: opts.store, secret: opts.secret, vm: opts.vm, generation: newGeneration, role: 'checkpointer' })
    .catch((err: unknown) => { throw err instanceof HydraError && err.code === 'HYDRA_STORE_STALE_GENERATION' ? err : unreachable(err); });
  await fence.close();
  await hooks.afterFence?.();

  const client = await StoreClient.connect({ address: opts.store, secret: opts.secret, vm: opts.vm, generation: opts.generation ?? 0, role: 'reader' })
    .catch((err: unknown) => { throw unreachable(err); });
  let keepClient = false;
  let devstateFile: string | undefined;
  try {
    // Pinned: every later read on this connection is of this generation and epoch, or refused.
    const meta = await client.getMeta(opts.generation, { pin: true }).catch((err: unknown) => {
      if (err instanceof HydraError && err.code === 'HYDRA_STORE_NO_IMAGE') return null;
      throw err;
    });
    if (!meta) throw new RestoreError('HYDRA_RESTORE_NO_IMAGE', `VM "${opts.vm}": the store at ${opts.store} holds no committed image${opts.generation ? ` of generation ${opts.generation}` : ''}`);
    if (meta.committedEpoch < 1) throw new RestoreError('HYDRA_RESTORE_NO_IMAGE', `VM "${opts.vm}": generation ${meta.generation} has no committed checkpoint`);
    const checked = validateImage(meta, { vm: opts.vm, ...(opts.generation !== undefined ? { generation: opts.generation } : {}), newGeneration });
    assertRestorableNics(checked.spec);
    // Network mode: the 2 MiB regions the VM wrote most in its last epochs are prefetched first (advisory: any error -> none).
    // At most 64 Ki of them (128 GiB): the pager spreads the list into an array push, which overflows the stack past ~120 Ki.
    const hotOffsets = opts.mode === 'network' && (opts.prefetch ?? true)
      ? (await client.getHotRegions(meta.generation, 65536).catch(() => [])).map((r) => r.offset).filter((o) => Number.isSafeInteger(o) && o >= 0 && o < meta.ramSize)
      : [];

    const paths = vmPaths(opts.vm);
    fs.mkdirSync(paths.dir, { recursive: true });
    devstateFile = path.join(paths.dir, `restore-devstate-g${meta.generation}-e${meta.committedEpoch}.bin`);
    let memoryPath: string | undefined;
    if (opts.mode === 'file') {
      if (!opts.storeDir) throw new RestoreError('HYDRA_RESTORE_BAD_ARGS', 'file mode needs the store directory (--store-dir) as this host sees it');
      const { openVmImage } = await import('../store/index.js');
      const image = await openVmImage(opts.storeDir, opts.vm, meta.generation);
      if (image.meta.committedEpoch !== meta.committedEpoch || image.meta.devstate.sha256 !== meta.devstate.sha256 || image.meta.ramSize !== meta.ramSize) {
        throw new RestoreError('HYDRA_RESTORE_EPOCH_MISMATCH', `VM "${opts.vm}": store reports epoch ${meta.committedEpoch}, image file holds ${image.meta.committedEpoch}`);
      }
      memoryPath = image.memoryPath;
      fs.copyFileSync(image.devstatePath, devstateFile);
    } else {
      fs.writeFileSync(devstateFile, await client.getDeviceState(meta.generation, meta.committedEpoch));
    }
    const devstate = fs.readFileSync(devstateFile);
    const digest = crypto.createHash('sha256').update(devstate).digest('hex');
    if (digest !== meta.devstate.sha256 || devstate.length !== meta.devstate.size) {
      throw new RestoreError('HYDRA_RESTORE_TORN_IMAGE', `VM "${opts.vm}": device state of epoch ${meta.committedEpoch} does not match its checksum (${devstate.length} bytes, sha256 ${digest.slice(0, 12)}…, expected ${meta.devstate.sha256.slice(0, 12)}…)`);
    }
    let diskFiles = opts.diskFiles;
    let layerDir: string | undefined;
    if (!diskFiles && meta.disks.length > 0 && checked.vmLayers) {
      const { prepareRestoreDisks } = await import('../disk/index.js');
      // Layers live in <layerDir>/<vm>/ (validated above); restore overlays go beside them, and the
      // new incarnation keeps the same layer root (no nesting across fail-overs).
      layerDir = path.dirname(checked.vmLayers);
      // A fresh overlay on exactly the layer frozen with this epoch: the failed primary's later writes are never seen.
      diskFiles = await prepareRestoreDisks(meta.disks, { vm: opts.vm, overlayDir: path.join(checked.vmLayers, 'restored') });
    }
    const prepareMs = performance.now() - t0;

    const spec = checked.spec;
    const accel = chooseAccel(spec.accel, spec.name);
    const tSpawn = performance.now();
    const state = await startVm(spec, {
      launch: {
        accel,
        ram: opts.mode === 'file' ? { kind: 'file-private', path: memoryPath! } : { kind: 'memfd' },
        incomingDefer: true,
        diskFiles,
        layerDir: layerDir ?? checked.layerDir,
      },
    });
    const spawnMs = performance.now() - tSpawn;

    let pager: NetworkPager | undefined;
    let qmp: QmpClient | undefined;
    try {
      if (opts.mode === 'network') {
        // The pager must own the guest RAM before QEMU touches it while loading devices.
        const prefetch = opts.prefetch ?? true;
        const paging = opts.paging ?? {};
        const connect = pagerConnect(opts, meta);
        const background = prefetch
          ? await Promise.all(Array.from({ length: Math.max(1, paging.streams ?? DEFAULT_STREAMS) }, () => connect.to(opts.store)))
          : [client];
        pager = await NetworkPager.start({
          vm: opts.vm, qemuPid: state.qemuPid!, urgent: client, background, meta, prefetch, hotOffsets, onProgress: opts.onProgress,
          reconnect: connect.any,
          ...(paging.reconnectMs !== undefined ? { reconnectMs: paging.reconnectMs } : {}),
          ...(paging.batchBytes !== undefined ? { batchBytes: paging.batchBytes } : {}),
          ...(paging.maxBytesPerS !== undefined ? { maxBytesPerS: paging.maxBytesPerS } : {}),
          ...((paging.guestDelay ?? DEFAULT_GUEST_DELAY) > 0 ? { guard: { maxDelay: paging.guestDelay ?? DEFAULT_GUEST_DELAY, minBytesPerS: paging.minBytesPerS ?? DEFAULT_MIN_BYTES_PER_S } } : {}),
        });
        // The pager reads through these connections until memory is complete.
        keepClient = true;
        const p = pager;
        // Memory is complete (or the pager failed and said so): closing the connections is cleanup.
        p.done.finally(() => Promise.all(p.clients().map((c) => c.close())).catch(() => undefined)).catch(() => undefined);
      }
      qmp = await connectWhenReady(paths.hydraQmpSocket, { label: `VM ${opts.vm}`, deadlineMs: 5000 });
      // While QEMU waits for the incoming state, `stop` only clears its autostart: the guest stays paused after loading.
      if (opts.paused) await qmp.execute('stop');
      const tLoad = performance.now();
      await qmp.execute('migrate-incoming', { uri: `file:${devstateFile}` });
      await waitMigration(qmp, opts.vm);
      const deviceLoadMs = performance.now() - tLoad;
      if (!opts.paused) await qmp.execute('cont');
      const tRun = performance.now();
      pager?.startPrefetch();
      const announced = await announceSelf(qmp, spec);
      const timings: RestoreTimings = {
        prepareMs,
        spawnMs,
        deviceLoadMs,
        spawnToRunningMs: performance.timeOrigin + tRun - (state.qemuSpawnedAt ?? performance.timeOrigin + tSpawn),
        launchToRunningMs: tRun - tSpawn,
        totalMs: tRun - t0,
      };
      log.info({ ...timings, generation: meta.generation, epoch: meta.committedEpoch, mode: opts.mode }, 'VM restored and running');
      qmp.close();
      const result: RestoreResult = { vm: opts.vm, mode: opts.mode, generation: meta.generation, epoch: meta.committedEpoch, newGeneration, timings, pager, announced };
      if (opts.protect) {
        // Write-protect tracking needs the range free of the pager's missing-page registration.
        if (pager) await pager.done;
        await protectVm({ vm: opts.vm, store: opts.store, intervalMs: opts.protect.intervalMs, generation: newGeneration, secretFile: opts.protect.secretFile });
      }
      return result;
    } catch (err) {
      qmp?.close();
      await pager?.stop();
      keepClient = false;
      // Undoing a failed restore; the restore's own error is thrown below.
      await stopVm(opts.vm).catch(() => undefined);
      // The pager stopping the VM (memory unreachable) is the cause of whatever QMP then reported.
      if (pager?.failure) throw pager.failure;
      if (err instanceof HydraError) throw err;
      throw new RestoreError('HYDRA_RESTORE_FAILED', `VM "${opts.vm}": restore failed: ${(err as Error).message}`, { cause: err });
    }
  } finally {
    if (devstateFile) fs.rmSync(devstateFile, { force: true });
    // Cleanup: the restore's outcome is already decided.
    if (!keepClient) await client.close().catch(() => undefined);
  }
}

/** Test-only hooks into a restore's steps (the fencing race test widens windows with them). */
export interface RestoreTestHooks {
  /** After the new generation is registered, before anything is read. */
  afterFence?: () => Promise<void>;
}

/** The store's highest generation for the VM plus one. */
async function nextGenerationAt(opts: RestoreOptions): Promise<number> {
  const c = await StoreClient.connect({ address: opts.store, secret: opts.secret, vm: opts.vm, generation: 0, role: 'reader' });
  try {
    return c.welcome.highestGeneration + 1;
  } finally {
    await c.close();
  }
}

/** Poll the incoming migration (events need a capability; polling is simpler and just as fast here). */
async function waitMigration(qmp: QmpClient, vm: string): Promise<void> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const info = await qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate');
    if (info.status === 'completed') return;
    if (info.status === 'failed' || info.status === 'cancelled') {
      throw new RestoreError('HYDRA_RESTORE_DEVICE_LOAD', `VM "${vm}": QEMU failed to load the device state: ${info['error-desc'] ?? info.status} (see qemu.log)`);
    }
    if (Date.now() > deadline) throw new RestoreError('HYDRA_RESTORE_DEVICE_LOAD', `VM "${vm}": device state load did not complete within 30 s`);
    await sleep(2);
  }
}

export type { PagerStats, PagingOptions, StoreMeta };
