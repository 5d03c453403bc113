// What a checkpoint daemon is told about its VM, its store and its limits (both modes).
import type { CheckpointStats, ProtectionStatus } from './stats.js';

export interface CheckpointerOptions {
  vm: string;
  qemuPid: number;
  /** QMP monitor reserved for the checkpointer. */
  qmpSocket: string;
  /** Where QEMU writes the device state during the pause (small, rewritten each time). */
  devstateFile: string;
  store: string;
  /** In a cluster: the active store's address, asked on every (re)connection (see joinStore). */
  resolveStore?: () => Promise<string>;
  secret: string;
  generation: number;
  intervalMs: number;
  /** The VM's launch configuration, kept with the image so a restore can start the same devices. */
  config: unknown;
  /**
   * Pre-faulted staging buffer the pause copies into: its first size (default
   * 64 MiB); it grows, outside the pause, to the dirty sets it sees, up to
   * stagingCapBytes (default 1 GiB, at most the RAM size), and shrinks back
   * when the interval's dirty sets stay far below it.
   */
  stagingBytes?: number;
  stagingCapBytes?: number;
  /** Called after every state change and commit. */
  onStatus?: (status: ProtectionStatus) => void;
  /** Called with each committed checkpoint's measurements. */
  onCheckpoint?: (stats: CheckpointStats) => void;
  /**
   * The VM's qcow2 disks: one layer is frozen per checkpoint, inside the pause,
   * so every committed epoch has a disk state that matches its memory.
   */
  disks?: { paths: { path: string }[]; layerDir: string };
  /** Copy-on-write was asked for and could not be given (why): basic checkpoints, and the status says so. */
  cowRefused?: string;
}
