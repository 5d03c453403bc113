/** The raw interface of the addon's copy-on-write session (native/addon/cow.cc). */

/** Opaque handle of a native CoW session. */
export type CowHandle = { readonly __cow: unique symbol };

export interface CowCollectResult {
  /** [offset, length] pairs of the grains now pending copy, ascending. */
  runs: Float64Array;
  grains: number;
  bytes: number;
  /** Time to turn the dirty set pending and write-protect what needs it. */
  protectMs: number;
  /** Grains that had to be protected in the pause (written since the pre-arm). */
  reprotectedGrains: number;
  /** Since the previous collect: write faults served, of which copies before the write, slot waits. */
  faults: number;
  cowCopies: number;
  /** Of those, grains whose ring slot was in use: copied to spill memory. */
  spills: number;
  serviceMeanUs: number;
  serviceMaxUs: number;
}

export interface CowBatch {
  /** [offset, length] pairs of RAM whose content lies packed at stagingOffset. */
  runs: Float64Array;
  stagingOffset: number;
  grains: number;
  bytes: number;
  /** This batch ends the checkpoint's copy. */
  done: boolean;
  /** The checkpoint was given up (reason says why); its grains go into the next one. */
  failed: boolean;
  reason: string;
}

export interface CowStats {
  totalFaults: number;
  failures: number;
  pendingGrains: number;
  copied: number;
  released: number;
  grains: number;
  grain: number;
  slots: number;
}

export interface RawCowAddon {
  /** Start the handler and copier threads on a uffd set up for sync write-protect and registered over RAM. */
  cowStart(uffd: number, pidfd: number, start: number, size: number, grain: number, ram: Buffer, staging: Buffer, maxSpillBytes: number, copierNice: number): CowHandle;
  /** Write-protect all RAM and forget the dirty set; returns ms. */
  cowArmAll(h: CowHandle): number;
  /** Before the pause (VM running): write-protect the dirty grains again; they stay dirty. */
  cowPrearm(h: CowHandle): { grains: number; ms: number };
  /** In the pause: dirty grains become pending; those written since the pre-arm are write-protected again. */
  cowCollect(h: CowHandle): CowCollectResult;
  cowWaitBatch(h: CowHandle, maxBytes: number, timeoutMs: number): Promise<CowBatch>;
  /** Replace the ring (between checkpoints); the caller keeps the Buffer alive. */
  cowSetStaging(h: CowHandle, staging: Buffer): void;
  /** After `cont`: let the copier start (it must not compete with the device-state save in the pause). */
  cowStartCopy(h: CowHandle): void;
  cowRelease(h: CowHandle, grains: number): void;
  cowFail(h: CowHandle, reason: string): void;
  cowStats(h: CowHandle): CowStats;
  /** Un-protect and unregister all RAM, stop the threads. Idempotent. */
  cowStop(h: CowHandle): void;
}
