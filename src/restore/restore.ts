import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { RestoreError, HydraError } from '../errors.js';
import { protectVm } from '../checkpoint/index.js';
import { StoreClient, type StoreMeta } from '../protocol/index.js';
import { startVm, stopVm, vmPaths, readState, isLive, chooseAccel, shellConfigOf, shellKey, type VmState, type VmSpec, type Accel, type QemuLaunchOptions } from '../vm/index.js';
import { handOff, type Handoff } from './shell-handoff.js';
import { FilePageSource } from './file-pages.js';
import { ImageWarmer } from './image-warmer.js';
import { connectWhenReady, type QmpClient } from '../qmp/index.js';
import { vmLog } from '../util/log.js';
import { DEFAULT_RECONNECT_MS, DEFAULT_STREAMS, NetworkPager, type PagerStats } from './network-pager.js';
import { DEFAULT_GUEST_DELAY, DEFAULT_MIN_BYTES_PER_S, pagerConnect, type PagingOptions } from './pager-connect.js';
import { validateImage } from './validate.js';
import { announceSelf, assertRestorableNics } from './nics.js';
import { sleep } from '../util/sleep.js';

export type RestoreMode = 'file' | 'network';

export interface RestoreOptions {
  vm: string;
  /** Store address host:port (both modes read metadata and, in network mode, pages from it). */
  store: string;
  /**
   * In a cluster: the address of the store serving the directory now. A
   * network-mode pager whose connection drops asks it and reconnects there.
   */
  resolveStore?: () => Promise<string>;
  /** Network mode: how guest memory is streamed, and which other stores to ask when the store fails meanwhile. */
  paging?: PagingOptions;
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
  /** Disk overlays to open instead of the spec's disks (prepared from the checkpoint's frozen layers). */
  diskFiles?: string[];
  /** Progress lines (prefetch). */
  onProgress?: (msg: string) => void;
  /** 'auto' (default): restore into an idle pre-started shell of the VM's configuration if this host has one; 'never': always start QEMU cold. */
  shell?: 'auto' | 'never';
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
  /** 1 when the VM was restored into a pre-started restore shell, 0 for a cold start. */
  warm: number;
  /** Warm: adopting the shell, opening the disks and attaching the pager. */
  shellHandoffMs?: number;
  /** The `cont` command. */
  contMs: number;
  /** Warm: from the end of preparation until the pager holds the shell's RAM (the adoption ran earlier when it could). */
  launchMs?: number;
  /** Connecting to the store and registering the new generation (the fence). */
  fenceMs: number;
  /** Reading and validating the pinned metadata. */
  metaMs: number;
}

/** Whether a restore shell was used, and if not, why (shown with the timings). */
export type RestoreShellUse = { used: true; key: string; id: string } | { used: false; key?: string; reason: string };

export interface RestoreResult {
  vm: string;
  mode: RestoreMode;
  generation: number;
  epoch: number;
  newGeneration: number;
  timings: RestoreTimings;
  /** Network mode: the pager keeps serving memory after this returns. */
  pager?: NetworkPager;
  /** File mode, cold start: the image file is being read into the page cache in the background. */
  warmer?: ImageWarmer;
  /** Whether QMP announce-self was sent after `cont` (the VM has NICs). */
  announced: boolean;
  shell: RestoreShellUse;
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
  const openReader = () => StoreClient.connect({ address: opts.store, secret: opts.secret, vm: opts.vm, generation: opts.generation ?? 0, role: 'reader' })
    .catch((err: unknown) => { throw unreachable(err); });
  // With the generation named, the reader's connection is bound to it whatever commits meanwhile, and
  // reads nothing before the fence: its handshake runs beside the fence's. Without, the store binds it
  // to the newest committed generation when it connects, which must be after the fence.
  let readerP = opts.generation !== undefined ? openReader() : undefined;
  // Awaited below; this only keeps a rejection while the fence runs from being unhandled.
  readerP?.catch(() => undefined);
  let newGeneration: number;
  let tFence: number;
  try {
    newGeneration = opts.newGeneration ?? (await nextGenerationAt(opts).catch((err: unknown) => { throw unreachable(err); }));
    if (!Number.isInteger(newGeneration) || newGeneration < 1 || newGeneration > 0xffffffff) throw new RestoreError('HYDRA_RESTORE_BAD_ARGS', `VM "${opts.vm}": new generation ${newGeneration} is outside 1..${0xffffffff}`);
    const fence = await StoreClient.connect({ address: opts.store, secret: opts.secret, vm: opts.vm, generation: newGeneration, role: 'checkpointer' })
      .catch((err: unknown) => { throw err instanceof HydraError && err.code === 'HYDRA_STORE_STALE_GENERATION' ? err : unreachable(err); });
    // The WELCOME came after the registration was durable: the fence holds. Its connection's
    // end is not waited for (a round trip), and a failed close changes nothing.
    void fence.close().catch(() => undefined);
    tFence = performance.now();
    await hooks.afterFence?.();
  } catch (err) {
    // The fence's error is the one to report; the reader opened beside it is closed (its own failure is moot).
    const r = await readerP?.catch(() => undefined);
    void r?.close().catch(() => undefined);
    throw err;
  }
  const client = await (readerP ?? openReader());
  readerP = undefined;
  let keepClient = false;
  let devstateFile: string | undefined;
  /** Started early, consumed once QEMU is there; whatever is left unconsumed is undone in `finally`. */
  let backgroundP: Promise<{ c: StoreClient; hot: number[] }> | undefined;
  let earlyHandoff: Promise<(Handoff & { key: string; ms: number }) | { reason: string; key?: string }> | undefined;
  try {
    // Pinned: every later read on this connection is of this generation and epoch, or refused.
    // File mode reads the image file itself: its epoch must be applied there. Network mode is served
    // the newest committed epoch at once, from the journal's data plus the image, while it is applied.
    const meta = await client.getMeta(opts.generation, { pin: true, ...(opts.mode === 'file' ? { applied: true } : {}) }).catch((err: unknown) => {
      if (err instanceof HydraError && err.code === 'HYDRA_STORE_NO_IMAGE') return null;
      throw err;
    });
    if (!meta) throw new RestoreError('HYDRA_RESTORE_NO_IMAGE', `VM "${opts.vm}": the store at ${opts.store} holds no committed image${opts.generation ? ` of generation ${opts.generation}` : ''}`);
    if (meta.committedEpoch < 1) throw new RestoreError('HYDRA_RESTORE_NO_IMAGE', `VM "${opts.vm}": generation ${meta.generation} has no committed checkpoint`);
    const checked = validateImage(meta, { vm: opts.vm, ...(opts.generation !== undefined ? { generation: opts.generation } : {}), newGeneration });
    assertRestorableNics(checked.spec);
    const tMeta = performance.now();
    const prefetch = opts.prefetch ?? true;
    // Network mode with prefetch: the second connection (background stream) is opened, pinned to the
    // same epoch, and asked for the heat record while this one fetches the device state. The
    // heat record lists the 2 MiB regions the VM wrote most in its last epochs, prefetched first
    // (advisory: any error -> none). At most 64 Ki of them (128 GiB): the pager spreads the list
    // into an array push, which overflows the stack past ~120 Ki.
    backgroundP = opts.mode === 'network' && prefetch ? (async () => {
      const c = await StoreClient.connect({ address: opts.store, secret: opts.secret, vm: opts.vm, generation: meta.generation, role: 'reader' });
      try {
        // States the same epoch and pins to it: refused if the image moved.
        await c.getMeta(meta.generation, { epoch: meta.committedEpoch, pin: true });
        // The heat record only orders the prefetch: without it, everything streams in address order.
        const hot = (await c.getHotRegions(meta.generation, 65536).catch(() => [])).map((r) => r.offset).filter((o) => Number.isSafeInteger(o) && o >= 0 && o < meta.ramSize);
        return { c, hot };
      } catch (err) {
        // The pinning failure is the one to report; a failed close changes nothing.
        await c.close().catch(() => undefined);
        throw err;
      }
    })() : undefined;
    // Settled here so an early failure elsewhere leaves no unhandled rejection; awaited below.
    backgroundP?.catch(() => undefined);
    // A VM without disks needs nothing more to pick its restore shell: adopt it meanwhile too.
    const accel = chooseAccel(checked.spec.accel, checked.spec.name);
    const wantShell = (opts.shell ?? 'auto') === 'auto';
    if (wantShell && meta.disks.length === 0 && !opts.diskFiles) {
      earlyHandoff = startHandoff(opts, checked.spec, accel, [], [], checked.layerDir, checked.nicPorts);
      // Awaited below (or in the finally); this only keeps an early rejection from being unhandled.
      earlyHandoff.catch(() => undefined);
    }
    let hotOffsets: number[] = [];

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
    let diskSizes: number[] | undefined;
    let layerDir: string | undefined;
    if (!diskFiles && meta.disks.length > 0 && checked.vmLayers) {
      const { prepareRestoreDiskSet } = await import('../disk/index.js');
      // Layers live in <layerDir>/<vm>/ (validated above); restore overlays go beside them, and the
      // new incarnation keeps the same layer root (no nesting across fail-overs).
      layerDir = path.dirname(checked.vmLayers);
      // A fresh overlay on exactly the layer frozen with this epoch: the failed primary's later writes are never seen.
      const set = await prepareRestoreDiskSet(meta.disks, { vm: opts.vm, overlayDir: path.join(checked.vmLayers, 'restored') });
      diskFiles = set.files;
      diskSizes = set.sizes;
    } else if (!diskFiles && meta.disks.length === 0) {
      diskSizes = [];
    }
    const prepareMs = performance.now() - t0;

    const spec = checked.spec;
    const tSpawn = performance.now();
    // A pre-started shell if one matches (its RAM is a memfd filled through userfaultfd in
    // both modes); otherwise, or if the hand-off fails before the VM is adopted, a cold start.
    let shell: RestoreShellUse = { used: false, reason: 'restore shells not asked for' };
    let state: VmState | undefined;
    let adoptMs: number | undefined;
    if (wantShell) {
      const h = await (earlyHandoff ?? startHandoff(opts, spec, accel, diskFiles, diskSizes, layerDir ?? checked.layerDir, checked.nicPorts));
      earlyHandoff = undefined;
      if ('reason' in h) shell = { used: false, ...(h.key ? { key: h.key } : {}), reason: h.reason };
      else {
        shell = { used: true, key: h.key, id: h.shellId };
        state = h.state;
        adoptMs = h.ms;
      }
      if (!shell.used) log.info({ reason: shell.reason }, 'no restore shell used: starting QEMU cold');
    }
    if (!state) {
      state = await startVm(spec, {
        launch: {
          accel,
          ram: opts.mode === 'file' ? { kind: 'file-private', path: memoryPath! } : { kind: 'memfd' },
          incomingDefer: true,
          diskFiles,
          layerDir: layerDir ?? checked.layerDir,
          // The source's NIC layout: the device state only loads into the same PCI topology.
          nicPorts: checked.nicPorts,
        },
      });
    }
    const spawnMs = performance.now() - tSpawn;

    let pager: NetworkPager | undefined;
    let qmp: QmpClient | undefined;
    try {
      if (opts.mode === 'network') {
        // The pager must own the guest RAM before QEMU touches it while loading devices.
        const pending = backgroundP;
        backgroundP = undefined;
        const bg = pending ? await pending : undefined;
        const background = bg?.c ?? client;
        hotOffsets = bg?.hot ?? [];
        // In a cluster a dropped connection is replaced by one pinned to the same generation and epoch, on
        // the store serving now (a standby may be taking over). A lone store that died does not come back:
        // its fetches fail after their retries and the VM is stopped.
        // Standby stores given (paging.alternates) are asked too.
        const resolveStore = opts.resolveStore;
        const paging = opts.paging ?? {};
        const connect = pagerConnect(opts, meta);
        const reconnect = resolveStore
          ? async () => connect.to(await resolveStore())
          : typeof paging.alternates === 'function' || (paging.alternates?.length ?? 0) > 0 ? connect.any : undefined;
        // More background streams beside the first (its connection was opened early, with the heat record).
        const more = prefetch && background !== client
          ? await Promise.all(Array.from({ length: Math.max(0, (paging.streams ?? DEFAULT_STREAMS) - 1) }, () => connect.to(opts.store)))
          : [];
        // Pages the image holds no data for are zeros: the pager fills them itself instead of streaming them.
        const dataRuns = await client.getDataRuns().catch((err: Error) => {
          log.info({ err: err.message }, 'no data runs from the store: every page is streamed');
          return undefined;
        });
        const started = await NetworkPager.start({
          vm: opts.vm, qemuPid: state.qemuPid!, urgent: client, background: [background, ...more], meta, prefetch, hotOffsets, onProgress: opts.onProgress,
          ...(dataRuns ? { dataRuns } : {}),
          ...(reconnect ? { reconnect } : {}),
          ...(paging.reconnectMs !== undefined ? { reconnectMs: paging.reconnectMs } : {}),
          ...(paging.batchBytes !== undefined ? { batchBytes: paging.batchBytes } : {}),
          ...(paging.maxBytesPerS !== undefined ? { maxBytesPerS: paging.maxBytesPerS } : {}),
          ...((paging.guestDelay ?? DEFAULT_GUEST_DELAY) > 0 ? { guard: { maxDelay: paging.guestDelay ?? DEFAULT_GUEST_DELAY, minBytesPerS: paging.minBytesPerS ?? DEFAULT_MIN_BYTES_PER_S } } : {}),
        });
        pager = started;
        // The pager reads through these connections until memory is complete.
        keepClient = true;
        // Memory is complete (or the pager failed and said so): closing the connections (the first ones and any replacements) is cleanup.
        started.done.finally(() => Promise.all([client, background, ...started.connections()].map((c) => c.close())).catch(() => undefined)).catch(() => undefined);
      } else if (shell.used) {
        const src = await FilePageSource.open(memoryPath!);
        const { fileDataRuns } = await import('../store/index.js');
        const dataRuns = fileDataRuns(memoryPath!, meta.ramSize, meta.pageSize);
        pager = await NetworkPager.start({ vm: opts.vm, qemuPid: state.qemuPid!, urgent: src, background: src, meta, prefetch, hotOffsets, onProgress: opts.onProgress, dataRuns });
        // Closing the image once every page is in (or the pager gave up) is cleanup.
        pager.done.finally(() => src.close()).catch(() => undefined);
      }
      const handoffMs = performance.now() - tSpawn;
      qmp = await connectWhenReady(paths.hydraQmpSocket, { label: `VM ${opts.vm}`, deadlineMs: 5000 });
      // While QEMU waits for the incoming state, `stop` only clears its autostart: the guest stays paused after loading.
      if (opts.paused) await qmp.execute('stop');
      const tLoad = performance.now();
      await qmp.execute('migrate-incoming', { uri: `file:${devstateFile}` });
      // Loading devices touches guest RAM: QEMU waits on the pager, which may spend its reconnect window
      // finding a store. Its failure (it stops the VM) is the answer then, not a QMP timeout.
      const pagerWaitMs = pager ? (opts.paging?.reconnectMs ?? DEFAULT_RECONNECT_MS) + 10_000 : 10_000;
      await Promise.race([
        waitMigration(qmp, opts.vm, pagerWaitMs),
        ...(pager ? [pager.done.then(() => new Promise<never>(() => undefined))] : []),
      ]);
      const deviceLoadMs = performance.now() - tLoad;
      const tCont = performance.now();
      if (!opts.paused) await qmp.execute('cont');
      const tRun = performance.now();
      pager?.startPrefetch();
      const announced = await announceSelf(qmp, spec);
      // Cold file mode: the private mapping faults on the file; warm the file so those faults are minor.
      const warmer = opts.mode === 'file' && !pager && prefetch && !opts.paused
        ? ImageWarmer.start({ vm: opts.vm, file: memoryPath!, qemuPid: state.qemuPid!, hotOffsets: await hotRegionsOf(client, meta), ...(opts.onProgress ? { onProgress: opts.onProgress } : {}) })
        : undefined;
      const timings: RestoreTimings = {
        prepareMs,
        spawnMs,
        deviceLoadMs,
        // A shell's QEMU was spawned long before: its restore counts from the hand-off.
        spawnToRunningMs: shell.used ? tRun - tSpawn : performance.timeOrigin + tRun - (state.qemuSpawnedAt ?? performance.timeOrigin + tSpawn),
        launchToRunningMs: tRun - tSpawn,
        totalMs: tRun - t0,
        warm: shell.used ? 1 : 0,
        // The adoption itself (it may have run beside the store reads), then what the launch step still took.
        ...(shell.used ? { shellHandoffMs: adoptMs ?? handoffMs, launchMs: handoffMs } : {}),
        fenceMs: tFence - t0,
        metaMs: tMeta - tFence,
        contMs: tRun - tCont,
      };
      log.info({ ...timings, generation: meta.generation, epoch: meta.committedEpoch, mode: opts.mode, shell }, 'VM restored and running');
      qmp.close();
      const result: RestoreResult = { vm: opts.vm, mode: opts.mode, generation: meta.generation, epoch: meta.committedEpoch, newGeneration, timings, pager, ...(warmer ? { warmer } : {}), announced, shell };
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
    if (earlyHandoff) {
      // The restore failed before it used the shell it adopted: that QEMU must not stay.
      const h = await earlyHandoff;
      // Best effort on a path that already fails: the restore's own error is the one reported.
      if (!('reason' in h)) await stopVm(opts.vm).catch(() => undefined);
    }
    if (backgroundP) {
      // Never handed to a pager: closing it is cleanup.
      const bg = await backgroundP.catch(() => undefined);
      await bg?.c.close().catch(() => undefined);
    }
    if (devstateFile) fs.rmSync(devstateFile, { force: true });
    // Cleanup: the restore's outcome is already decided.
    if (!keepClient) await client.close().catch(() => undefined);
  }
}

/**
 * Adopt an idle restore shell of the VM's configuration (see shell-handoff.ts).
 * Never throws: a refusal or a failure after adoption (whose QEMU is stopped
 * here) comes back as the reason for a cold start.
 */
async function startHandoff(opts: RestoreOptions, spec: VmSpec, accel: Accel, diskFiles: string[] | undefined, diskSizes: number[] | undefined, layerDir: string | undefined, nicPorts: boolean): Promise<(Handoff & { key: string; ms: number }) | { reason: string; key?: string }> {
  const cfg = diskSizes ? shellConfigOf(spec, accel, diskSizes, nicPorts) : { reason: 'disk overlays given by the caller (sizes unknown)' };
  if ('reason' in cfg) return { reason: cfg.reason };
  const key = shellKey(cfg.config);
  const launch: QemuLaunchOptions = { accel, ram: { kind: 'memfd' }, incomingDefer: true, nicPorts: true, ...(diskFiles ? { diskFiles } : {}), ...(layerDir ? { layerDir } : {}) };
  const t0 = performance.now();
  try {
    const h = await handOff(spec, launch, key, diskFiles ?? []);
    return 'reason' in h ? { ...h, key } : { ...h, key, ms: performance.now() - t0 };
  } catch (err) {
    // Adopted but not usable: the shell's QEMU is now this VM's and must go before a cold start.
    await stopVm(opts.vm).catch(() => undefined);
    return { key, reason: `hand-off to a restore shell failed: ${(err as Error).message}` };
  }
}

/** Test-only hooks into a restore's steps (the fencing race test widens windows with them). */
export interface RestoreTestHooks {
  /** After the new generation is registered, before anything is read. */
  afterFence?: () => Promise<void>;
}

/** The heat record's region offsets (advisory: none on any error). */
async function hotRegionsOf(client: StoreClient, meta: StoreMeta): Promise<number[]> {
  // Advisory: the heat record only orders the warming; without it the file is read in address order.
  const regions = await client.getHotRegions(meta.generation, 65536).catch(() => []);
  return regions.map((r) => r.offset).filter((o) => Number.isSafeInteger(o) && o >= 0 && o < meta.ramSize);
}

/** The store's highest generation for the VM plus one. */
async function nextGenerationAt(opts: RestoreOptions): Promise<number> {
  const c = await StoreClient.connect({ address: opts.store, secret: opts.secret, vm: opts.vm, generation: 0, role: 'reader' });
  // Only the WELCOME was needed: its connection's end is not waited for, and a failed close changes nothing.
  void c.close().catch(() => undefined);
  return c.welcome.highestGeneration + 1;
}

/** Poll the incoming migration (events need a capability; polling is simpler and just as fast here). */
async function waitMigration(qmp: QmpClient, vm: string, commandTimeoutMs: number): Promise<void> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const info = await qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate', undefined, { timeoutMs: commandTimeoutMs });
    if (info.status === 'completed') return;
    if (info.status === 'failed' || info.status === 'cancelled') {
      throw new RestoreError('HYDRA_RESTORE_DEVICE_LOAD', `VM "${vm}": QEMU failed to load the device state: ${info['error-desc'] ?? info.status} (see qemu.log)`);
    }
    if (Date.now() > deadline) throw new RestoreError('HYDRA_RESTORE_DEVICE_LOAD', `VM "${vm}": device state load did not complete within 30 s`);
    await sleep(2);
  }
}

export type { PagerStats, PagingOptions, StoreMeta };
