// What a fail-over benchmark run is asked for and what it records: one result per fail-over, one for QEMU's baseline.
import type { RestoreMode, RestoreTimings, PagerStats } from '../restore/index.js';

export interface FailoverBenchOptions {
  outDir: string;
  repeats: number;
  memory: string;
  workingSetMb: number;
  rateMb: number;
  intervalMs: number;
  /** Seconds of memcheck measured before the kill and after the restore. */
  windowS: number;
  /** Seconds a pure on-demand (no prefetch) restore runs before it is stopped. */
  noPrefetchS: number;
  /** Agent-only failures in an embedded cluster measuring self-fencing (0: none). */
  fencingRounds: number;
  /** Run only the self-fencing rounds. */
  fencingOnly?: boolean;
  /** Network paging part: guest sizes (none: skip), stream controls (guard, none, MB/s), background connections. */
  paging?: { sizes: string[]; modes: string[]; streams: number };
  /** Run only the paging part. */
  pagingOnly?: boolean;
  /** Restores into a pre-started restore shell, cold QEMU starts, or both (default both). */
  shells?: 'both' | 'warm' | 'cold';
  /** Skip QEMU's full save/restore baseline (its table is then absent). */
  noQemuBaseline?: boolean;
  log: (msg: string) => void;
}

export interface RunResult {
  mode: RestoreMode;
  prefetch: boolean;
  /** Restored into a pre-started restore shell (asked for); `restore.warm` says whether one was used. */
  warm: boolean;
  /** Why no shell was used, when none was. */
  shellMiss?: string;
  vm: string;
  accel: string;
  /** QEMU spawn (startVm) to the first memcheck progress line: the reboot baseline. */
  bootMs: number;
  initialCopyMs: number | null;
  epochAtKill: number;
  /** Last memcheck step printed before the kill, and the first printed by the restored VM. */
  stepBeforeKill: number | null;
  stepFirstAfter: number | null;
  /** SIGKILL to `crashed` in state.json. */
  detectMs: number;
  /** SIGKILL until the supervisor is gone too (restoreVm refuses while it lives). */
  goneMs: number;
  restore: RestoreTimings;
  /** SIGKILL to the restored guest running (cont returned). */
  killToRunningMs: number;
  /** SIGKILL to the first new memcheck progress line. */
  killToProgressMs: number | null;
  /** memcheck steps/s of the protected, unfailed VM in the window before the kill. */
  stepsPerSBefore: number | null;
  /** ... and in the window right after the restore. */
  stepsPerSAfter: number | null;
  pager?: PagerStats & { elapsedMs: number; faultsPerS: number | null; completeAfterRunningMs: number | null };
  violations: number;
}

export interface QemuBaseline {
  vm: string;
  bootMs: number;
  /** migrate to file: of the stopped VM, until completed. */
  saveMs: number;
  fileBytes: number;
  /** New QEMU spawned until `cont` returned (incoming migration of the whole RAM). */
  spawnToRunningMs: number;
  /** spawn to QMP answering; migrate-incoming until completed. */
  spawnMs: number;
  loadMs: number;
  /** spawn to the first memcheck progress line of the restored guest. */
  spawnToProgressMs: number | null;
  /** The same restore again after evicting the saved file from the page cache. */
  cold?: { spawnToRunningMs: number; spawnMs: number; loadMs: number };
  violations: number;
}
