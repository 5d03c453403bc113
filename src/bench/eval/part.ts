// What every part of the evaluation gets (options, the store, progress) and gives back (configuration and raw samples).
import type { Progress } from './progress.js';
import type { Capabilities, PartId } from './types.js';

export interface EvalOptions {
  quick: boolean;
  /** VM sizes in GB for the size part. */
  sizesGb: number[];
  /** VM counts per store for the VMs part. */
  vmCounts: number[];
  /** Sizes in GB of the fully populated guests QEMU's full save/restore is measured on. */
  baselineSizesGb: number[];
  /** QEMU full restores per size and cache state (n >= 3 in a full run). */
  baselineRepeats: number;
  /** Protect → kill → restore rounds per VM size. */
  restoreRounds: number;
  /** Incremental checkpoints measured per protection. */
  checkpoints: number;
  /** Seconds of each measuring window (overhead, VMs per store). */
  windowS: number;
  /** Unprotected/protected window pairs in the overhead part. */
  overheadRounds: number;
}

export function defaultOptions(quick: boolean): EvalOptions {
  return quick
    ? { quick, sizesGb: [0.5], vmCounts: [1], baselineSizesGb: [0.5], baselineRepeats: 1, restoreRounds: 1, checkpoints: 3, windowS: 8, overheadRounds: 1 }
    : { quick, sizesGb: [0.5, 1, 2, 4, 8], vmCounts: [1, 2, 4, 8], baselineSizesGb: [0.5, 1], baselineRepeats: 3, restoreRounds: 2, checkpoints: 6, windowS: 15, overheadRounds: 3 };
}

export interface PartContext {
  opts: EvalOptions;
  caps: Capabilities;
  progress: Progress;
}

export interface PartOutcome<S = unknown> {
  config: Record<string, unknown>;
  samples: S[];
  waitingFor?: string[];
  waiting?: { what: string; needs: string[] }[];
  errors?: { what: string; error: string }[];
}

export interface Part<S = unknown> {
  id: PartId;
  title: string;
  /** Samples the part will take and a rough duration of each, for the ETA. */
  plan(opts: EvalOptions, caps: Capabilities): { samples: number; estimateS: number; weights?: number[] };
  run(ctx: PartContext): Promise<PartOutcome<S>>;
}
