// The evaluation's JSON: one document per `hydravm bench eval` run, from which every table, plot and docs/evaluation.md are rendered.

export type PartId = 'size' | 'vms' | 'baseline' | 'overhead' | 'paper';
export const PART_IDS: PartId[] = ['size', 'vms', 'baseline', 'overhead', 'paper'];

export type PartStatus = 'done' | 'waiting' | 'failed';

export interface LoadSample {
  at: string;
  /** 1, 5 and 15 minute load averages. */
  loadavg: number[];
}

export interface Environment {
  machine: { cpuModel: string; cores: number; memGiB: number; kernel: string };
  qemu: { binary: string; version: string };
  accel: string;
  git: { commit: string; dirty: boolean; branch: string };
  node: string;
}

/** One part of the evaluation: its configuration, every raw sample, and the load around it. */
export interface PartResult<S = unknown> {
  id: PartId;
  title: string;
  status: PartStatus;
  /** What a waiting part needs that this build lacks (e.g. the Debian guest image). */
  waitingFor?: string[];
  error?: string;
  startedAt: string;
  durationS: number;
  load: { start: LoadSample; end: LoadSample };
  config: Record<string, unknown>;
  samples: S[];
  /** Sub-results that wait (a part may run some rows and wait on others). */
  waiting?: { what: string; needs: string[] }[];
  /** Configurations that failed while the rest of the part went on (e.g. the largest VM timing out). */
  errors?: { what: string; error: string }[];
}

export interface EvalDocument {
  schema: 'hydravm-eval/1';
  startedAt: string;
  finishedAt: string;
  durationS: number;
  quick: boolean;
  /** The command line as typed (argv after node). */
  command: string[];
  environment: Environment;
  capabilities: Capabilities;
  parts: PartResult[];
  /** Parts not run yet: present only in the file a run writes between parts (a run stopped early leaves it). */
  unfinished?: PartId[];
  /** A document merged from several runs (`bench eval-merge`): each run, and the parts taken from it. */
  runs?: EvalRun[];
}

export interface EvalRun {
  command: string[];
  startedAt: string;
  finishedAt: string;
  durationS: number;
  commit: string;
  parts: PartId[];
  unfinished?: PartId[];
}

export interface Capabilities {
  /** `hydravm image build` exists (the Debian guest with gcc, make, ffmpeg). */
  debianImage: boolean;
  /** The Debian image runs a workload named on the kernel command line (`hydra.workload=<id>`) and reports its progress. */
  debianWorkloads: boolean;
  /** `hydravm protect --cow` is accepted (copy-on-write checkpoints). */
  cow: boolean;
  /** The protection modes this build measures. */
  modes: ('basic' | 'cow')[];
}
