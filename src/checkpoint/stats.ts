/** Per-checkpoint measurements, and the protection status file built from them. */
export interface CheckpointStats {
  epoch: number;
  kind: 'full' | 'incremental';
  startedAt: number;
  /** The pause as the checkpointer sees it: from `stop` sent to `cont` answered (two QMP round trips more than the VM's). */
  pauseMs: number;
  /** The VM's own pause by QEMU's clock: its STOP event (vCPUs halted) to its RESUME event. */
  vmPausedMs?: number;
  stopMs: number;
  collectMs: number;
  copyMs: number;
  /** QEMU saving the device state; it runs while pages are collected and copied, so it overlaps them. */
  devstateMs: number;
  diskMs: number;
  contMs: number;
  pages: number;
  bytes: number;
  devstateBytes: number;
  /** Handing the checkpoint to the store (after the VM resumed). */
  sendMs: number;
  /** From the end of sending to the store's durable acknowledgement. */
  commitMs: number;
  /** Time since the previous checkpoint started. */
  intervalMs: number | null;
  /** Layers in the longest disk chain after this checkpoint (0 without disks). */
  diskChainLength: number;
  /** Basic mode: pre-copy rounds sent while the VM ran, before the pause; staging size in use. */
  precopyRounds?: number;
  stagingBytes?: number;
  /** Copy-on-write mode (see cow-checkpointer.ts). */
  cow?: CowCheckpointStats;
}

/** What a copy-on-write checkpoint adds: collectMs is the re-arm of the dirty grains, copyMs the copy after `cont`. */
export interface CowCheckpointStats {
  grain: number;
  /** Write faults served during the interval before this pause (first writes of a grain). */
  faults: number;
  /** Of those, writes to a grain still pending copy: copied by the fault handler first. */
  cowCopies: number;
  /** Of those, grains whose staging slot was still in use: copied to spill memory instead. */
  spills: number;
  serviceMeanUs: number;
  serviceMaxUs: number;
  /** Re-protecting the dirty grains just before the pause (VM running), and the grains the pause itself re-protected. */
  prearmMs?: number;
  reprotectedInPause?: number;
}

export interface ProtectionStatus {
  vm: string;
  store: string;
  generation: number;
  state: 'starting' | 'initial-copy' | 'protected' | 'retrying' | 'stopped' | 'failed';
  /** 'cow': copy-on-write checkpoints; absent or 'basic': pages copied inside the pause. */
  mode?: 'basic' | 'cow';
  /** Copy-on-write was asked for but the VM is checkpointed in basic mode: why. */
  cowRefused?: string;
  /** Copy-on-write checkpoints given up (their grains went into the next one). */
  cowFailures?: number;
  reason?: string;
  pid: number;
  configuredIntervalMs: number;
  committedEpoch: number;
  lastCommitAt: number | null;
  initialCopy?: { bytesSent: number; bytesTotal: number; ms?: number };
  /** Disk layer merges (background), when the VM has disks. */
  diskMerges?: { merges: number; layersMerged: number; lastMergeMs: number | null; totalMergeMs: number; cancelled: number };
  last?: CheckpointStats;
  /** Medians over the recent window. */
  recent: { count: number; medianPauseMs: number | null; p99PauseMs: number | null; medianIntervalMs: number | null; medianBytes: number | null };
  updatedAt: number;
}

export function quantile(values: number[], q: number): number | null {
  if (values.length === 0) return null;
  const s = [...values].sort((a, b) => a - b);
  const idx = Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1));
  return s[idx]!;
}

export function summarize(history: CheckpointStats[]): ProtectionStatus['recent'] {
  const incr = history.filter((h) => h.kind === 'incremental');
  const intervals = incr.map((h) => h.intervalMs).filter((v): v is number => v !== null);
  return {
    count: history.length,
    medianPauseMs: quantile(incr.map((h) => h.pauseMs), 0.5),
    p99PauseMs: quantile(incr.map((h) => h.pauseMs), 0.99),
    medianIntervalMs: quantile(intervals, 0.5),
    medianBytes: quantile(incr.map((h) => h.bytes), 0.5),
  };
}
