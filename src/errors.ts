// The error catalogue: every error HydraVM raises on purpose, by family, each with a literal code (docs/errors.md explains each).
/**
 * Each error has a literal `code` a script can match on, a message that names
 * the VM / file / step involved, and a `cause` when it wraps a lower-level
 * error. A family is one class with the union of its codes; add a code to its
 * family's list here and a line to docs/errors.md (a test checks both).
 */
export const ERROR_CODES = {
  config: ['HYDRA_SECRET_MISSING', 'HYDRA_SECRET_WEAK'],
  spec: ['HYDRA_SPEC_INVALID'],
  vm: ['HYDRA_VM_EXISTS', 'HYDRA_VM_NOT_FOUND', 'HYDRA_VM_CONTROL_TIMEOUT', 'HYDRA_VM_SERIAL_TIMEOUT', 'HYDRA_VM_CONSOLE', 'HYDRA_VM_QMP_UNAVAILABLE', 'HYDRA_VM_SHELL_BUSY', 'HYDRA_VM_SHELL_FAILED'],
  qemu: ['HYDRA_QEMU_FAILED'],
  qmp: ['HYDRA_QMP_ERROR', 'HYDRA_QMP_TIMEOUT', 'HYDRA_QMP_CLOSED'],
  setup: ['HYDRA_SETUP_FAILED'],
  native: ['HYDRA_NATIVE_NOT_BUILT', 'HYDRA_NATIVE_BUILD_FAILED', 'HYDRA_NATIVE_SHIM_MISSING'],
  tracker: [
    'HYDRA_TRACKER_ARM_FAILED', 'HYDRA_TRACKER_BAD_RANGE', 'HYDRA_TRACKER_BUSY', 'HYDRA_TRACKER_CLOSED', 'HYDRA_TRACKER_COPY_FAILED',
    'HYDRA_TRACKER_COW_FAILED', 'HYDRA_TRACKER_COW_UNSUPPORTED',
    'HYDRA_TRACKER_FAULT_WAIT_FAILED', 'HYDRA_TRACKER_FILL_FAILED', 'HYDRA_TRACKER_KERNEL_UNSUPPORTED', 'HYDRA_TRACKER_MAP_FAILED',
    'HYDRA_TRACKER_NO_MEMORY', 'HYDRA_TRACKER_NO_RAM', 'HYDRA_TRACKER_NO_RAM_VIEW', 'HYDRA_TRACKER_NO_UFFD', 'HYDRA_TRACKER_PROCESS_GONE',
    'HYDRA_TRACKER_PROC_FAILED', 'HYDRA_TRACKER_RAM_TOO_LARGE', 'HYDRA_TRACKER_RANGE_BUSY', 'HYDRA_TRACKER_RANGE_CHANGED', 'HYDRA_TRACKER_SCAN_FAILED',
  ],
  io: ['HYDRA_IO_FAILED', 'HYDRA_IO_NO_SPACE', 'HYDRA_IO_READ_ONLY'],
  store: [
    'HYDRA_STORE_APPLY_FAILED', 'HYDRA_STORE_BAD_ADDRESS', 'HYDRA_STORE_BAD_CRASH_POINT', 'HYDRA_STORE_BAD_GENERATION', 'HYDRA_STORE_BAD_PAGE_SIZE',
    'HYDRA_STORE_BAD_RAM_SIZE', 'HYDRA_STORE_BAD_RUN', 'HYDRA_STORE_BAD_VM_NAME', 'HYDRA_STORE_BUSY', 'HYDRA_STORE_CHECKPOINTER_BUSY',
    'HYDRA_STORE_CONNECTION_LOST', 'HYDRA_STORE_DEVSTATE_CORRUPT', 'HYDRA_STORE_DIR_BUSY', 'HYDRA_STORE_EPOCH_MISMATCH', 'HYDRA_STORE_EPOCH_MOVED', 'HYDRA_STORE_GENERATION_BUSY',
    'HYDRA_STORE_HEAT_CORRUPT', 'HYDRA_STORE_IMAGE_CORRUPT', 'HYDRA_STORE_IMAGE_MISSING', 'HYDRA_STORE_INTERNAL', 'HYDRA_STORE_JOURNAL_CORRUPT',
    'HYDRA_STORE_JOURNAL_UNREADABLE', 'HYDRA_STORE_JOURNAL_VERSION', 'HYDRA_STORE_META_CORRUPT', 'HYDRA_STORE_META_UNREADABLE', 'HYDRA_STORE_META_VERSION',
    'HYDRA_STORE_NO_BASE_IMAGE', 'HYDRA_STORE_NO_CHECKPOINT', 'HYDRA_STORE_NO_DEVSTATE', 'HYDRA_STORE_NO_DIR', 'HYDRA_STORE_NO_GENERATION',
    'HYDRA_STORE_NO_IMAGE', 'HYDRA_STORE_NO_SECRET', 'HYDRA_STORE_RAM_SIZE_MISMATCH', 'HYDRA_STORE_READ_TOO_LARGE', 'HYDRA_STORE_RECOVERY_PENDING',
    'HYDRA_STORE_STALE_GENERATION', 'HYDRA_STORE_START_FAILED', 'HYDRA_STORE_TIMEOUT', 'HYDRA_STORE_UNREACHABLE', 'HYDRA_STORE_UNSUPPORTED',
    'HYDRA_STORE_TLS_CONFIG', 'HYDRA_STORE_TLS_FAILED', 'HYDRA_STORE_TLS_REQUIRED', 'HYDRA_STORE_NOT_ACTIVE', 'HYDRA_STORE_NOT_PINNED',
  ],
  protocol: [
    'HYDRA_PROTOCOL_BAD_CRC', 'HYDRA_PROTOCOL_BAD_MAGIC', 'HYDRA_PROTOCOL_BAD_PAYLOAD', 'HYDRA_PROTOCOL_BAD_RUN', 'HYDRA_PROTOCOL_BAD_TYPE',
    'HYDRA_PROTOCOL_DECODER_FAILED', 'HYDRA_PROTOCOL_FRAME_TOO_LARGE', 'HYDRA_PROTOCOL_SHORT_REPLY', 'HYDRA_PROTOCOL_TIMEOUT',
    'HYDRA_PROTOCOL_UNEXPECTED', 'HYDRA_PROTOCOL_VERSION', 'HYDRA_STORE_AUTH_FAILED',
    'HYDRA_PROTOCOL_BAD_MAC', 'HYDRA_PROTOCOL_UNAUTHENTICATED', 'HYDRA_PROTOCOL_PIPELINED',
  ],
  checkpoint: ['HYDRA_CKPT_ALREADY', 'HYDRA_CKPT_BAD_FAULT', 'HYDRA_CKPT_COW_COPY_FAILED', 'HYDRA_CKPT_EPOCH_MISMATCH', 'HYDRA_CKPT_FAILED', 'HYDRA_CKPT_FENCED', 'HYDRA_CKPT_INJECTED', 'HYDRA_CKPT_TIMEOUT', 'HYDRA_CKPT_VM_NOT_RUNNING'],
  restore: [
    'HYDRA_RESTORE_BAD_ARGS', 'HYDRA_RESTORE_BAD_CONFIG', 'HYDRA_RESTORE_BAD_IMAGE', 'HYDRA_RESTORE_DEVICE_LOAD', 'HYDRA_RESTORE_EPOCH_MISMATCH', 'HYDRA_RESTORE_FAILED',
    'HYDRA_RESTORE_NIC_UNSUPPORTED', 'HYDRA_RESTORE_NO_IMAGE', 'HYDRA_RESTORE_PAGE_FETCH', 'HYDRA_RESTORE_STORE_UNREACHABLE', 'HYDRA_RESTORE_TORN_IMAGE', 'HYDRA_RESTORE_VM_ALIVE',
  ],
  disk: [
    'HYDRA_DISK_BUSY', 'HYDRA_DISK_FREEZE_FAILED', 'HYDRA_DISK_LAYER_CORRUPT', 'HYDRA_DISK_LAYER_ID_INVALID', 'HYDRA_DISK_LAYER_MISSING',
    'HYDRA_DISK_MERGE_FAILED', 'HYDRA_DISK_NOT_PREPARED', 'HYDRA_DISK_NO_SPACE', 'HYDRA_DISK_PREPARE_FAILED', 'HYDRA_DISK_QEMU_IMG',
    'HYDRA_DISK_RESTORE_FAILED', 'HYDRA_DISK_UNSUPPORTED',
  ],
  ha: [
    'HYDRA_ETCD_FAILED', 'HYDRA_ETCD_MISSING', 'HYDRA_HA_BAD_HOST', 'HYDRA_HA_BAD_REQUEST', 'HYDRA_HA_CLUSTER_RUNNING', 'HYDRA_HA_CONTENDED',
    'HYDRA_HA_ELECTION_LOST', 'HYDRA_HA_HOME', 'HYDRA_HA_LEASE', 'HYDRA_HA_NO_ETCD', 'HYDRA_HA_NO_HOST',
    'HYDRA_HA_PROTECT_FAILED', 'HYDRA_HA_SPAWN', 'HYDRA_HA_STOPPED', 'HYDRA_HA_TIMEOUT', 'HYDRA_HA_VM_MANAGED',
    'HYDRA_HA_HW_WATCHDOG', 'HYDRA_HA_BAD_ASSIGNMENT', 'HYDRA_HA_HOST_DEAD', 'HYDRA_ETCD_CREDENTIALS', 'HYDRA_HA_NO_STORE',
  ],
  netns: ['HYDRA_NETNS_ADDRESS_IN_USE', 'HYDRA_NETNS_FAILED', 'HYDRA_NETNS_IP_MISSING', 'HYDRA_NETNS_LEFTOVER', 'HYDRA_NETNS_NOT_ROOT'],
  net: ['HYDRA_NET_BRIDGE_MISSING', 'HYDRA_NET_TAP_PERMISSION', 'HYDRA_NET_TAP_BUSY', 'HYDRA_NET_TAP_FAILED', 'HYDRA_NET_MAC_CLASH'],
  image: ['HYDRA_IMAGE_NO_SPACE', 'HYDRA_IMAGE_BUILD_FAILED', 'HYDRA_IMAGE_BAD_ARGS'],
  redis: ['HYDRA_REDIS_CONNECT', 'HYDRA_REDIS_TIMEOUT', 'HYDRA_REDIS_CLOSED', 'HYDRA_REDIS_ERROR', 'HYDRA_REDIS_PROTOCOL', 'HYDRA_REDIS_BUSY'],
  bench: ['HYDRA_BENCH_NO_PROGRESS', 'HYDRA_BENCH_TIMEOUT', 'HYDRA_BENCH_MIGRATION_FAILED', 'HYDRA_BENCH_PROTECT_FAILED', 'HYDRA_BENCH_WRONG_RESULT', 'HYDRA_BENCH_BAD_OPTION', 'HYDRA_BENCH_BAD_RESULTS', 'HYDRA_BENCH_SETUP_FAILED', 'HYDRA_DEMO_VIOLATIONS'],
} as const;

export type ErrorFamily = keyof typeof ERROR_CODES;
export type CodeOf<F extends ErrorFamily> = (typeof ERROR_CODES)[F][number];
export type HydraCode = CodeOf<ErrorFamily>;
export type ConfigCode = CodeOf<'config'>;
export type VmCode = CodeOf<'vm'>;
export type NativeCode = CodeOf<'native'>;
export type TrackerCode = CodeOf<'tracker'>;
export type IoCode = CodeOf<'io'>;
export type StoreCode = CodeOf<'store'>;
export type ProtocolCode = CodeOf<'protocol'>;
export type CheckpointCode = CodeOf<'checkpoint'>;
export type RestoreCode = CodeOf<'restore'>;
export type DiskCode = CodeOf<'disk'>;
export type HaCode = CodeOf<'ha'>;
export type NetnsCode = CodeOf<'netns'>;
export type BenchCode = CodeOf<'bench'>;
export type NetCode = CodeOf<'net'>;
export type ImageCode = CodeOf<'image'>;
export type RedisCode = CodeOf<'redis'>;

type Options = { cause?: unknown };

export abstract class HydraError<C extends HydraCode = HydraCode> extends Error {
  readonly code: C;
  constructor(code: C, message: string, options?: Options) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

/** The cluster secret is missing or unusable. */
export class ConfigError extends HydraError<ConfigCode> {}

/** Bad user input: a spec, a flag, a name. */
export class SpecError extends HydraError<'HYDRA_SPEC_INVALID'> {
  constructor(message: string, options?: Options) {
    super('HYDRA_SPEC_INVALID', message, options);
  }
}

/** A local VM, its supervisor or its serial log did not do what was asked. */
export class VmError extends HydraError<VmCode> {}

export class VmExistsError extends VmError {
  constructor(name: string) {
    super('HYDRA_VM_EXISTS', `VM "${name}" is already running`);
  }
}

export class VmNotFoundError extends VmError {
  constructor(name: string) {
    super('HYDRA_VM_NOT_FOUND', `no VM named "${name}"`);
  }
}

export class QemuError extends HydraError<'HYDRA_QEMU_FAILED'> {
  constructor(message: string, options?: Options) {
    super('HYDRA_QEMU_FAILED', message, options);
  }
}

export class QmpError extends HydraError<'HYDRA_QMP_ERROR'> {
  /** QMP's own error class, e.g. "GenericError", when QEMU answered with an error. */
  readonly qmpClass: string | undefined;
  constructor(message: string, qmpClass?: string, options?: Options) {
    super('HYDRA_QMP_ERROR', message, options);
    this.qmpClass = qmpClass;
  }
}

export class QmpTimeoutError extends HydraError<'HYDRA_QMP_TIMEOUT'> {
  constructor(message: string) {
    super('HYDRA_QMP_TIMEOUT', message);
  }
}

export class QmpClosedError extends HydraError<'HYDRA_QMP_CLOSED'> {
  constructor(message: string, options?: Options) {
    super('HYDRA_QMP_CLOSED', message, options);
  }
}

export class SetupError extends HydraError<'HYDRA_SETUP_FAILED'> {
  constructor(message: string, options?: Options) {
    super('HYDRA_SETUP_FAILED', message, options);
  }
}

/** The native addon or shim is missing or the kernel lacks a feature it needs. */
export class NativeError extends HydraError<NativeCode> {}
export class TrackerError extends HydraError<TrackerCode> {}
/** A file-system call failed; the message names the step and the file. */
export class IoError extends HydraError<IoCode> {}
export class StoreError extends HydraError<StoreCode> {}
export class ProtocolError extends HydraError<ProtocolCode> {}
export class CheckpointError extends HydraError<CheckpointCode> {}
export class RestoreError extends HydraError<RestoreCode> {}
/** Disk state: overlays, layers, merges. */
export class DiskError extends HydraError<DiskCode> {}
/** The HA layer: etcd, agents, the manager. */
export class HaError extends HydraError<HaCode> {}
/** Hosts that are network namespaces: `ip`, privileges, addresses, leftovers. */
export class NetnsError extends HydraError<NetnsCode> {}
/** A benchmark or the demo found its run unusable. */
export class BenchError extends HydraError<BenchCode> {}
/** VM networking on this host: bridges, taps, MACs. */
export class NetError extends HydraError<NetCode> {}
/** Guest images (`hydravm image build`). */
export class ImageError extends HydraError<ImageCode> {}
/** The redis client that watches a VM's service from outside (src/bench/redis-watcher.ts). */
export class RedisClientError extends HydraError<RedisCode> {}

/** One constructor per family, taking any of its codes (the store's ERROR frames are rebuilt with these). */
const FAMILY_ERROR: { [F in ErrorFamily]: (code: CodeOf<F>, message: string, options?: Options) => HydraError } = {
  config: (code, message, options) => new ConfigError(code, message, options),
  spec: (_code, message, options) => new SpecError(message, options),
  vm: (code, message, options) => new VmError(code, message, options),
  qemu: (_code, message, options) => new QemuError(message, options),
  qmp: (code, message, options) => code === 'HYDRA_QMP_TIMEOUT' ? new QmpTimeoutError(message) : code === 'HYDRA_QMP_CLOSED' ? new QmpClosedError(message, options) : new QmpError(message, undefined, options),
  setup: (_code, message, options) => new SetupError(message, options),
  native: (code, message, options) => new NativeError(code, message, options),
  tracker: (code, message, options) => new TrackerError(code, message, options),
  io: (code, message, options) => new IoError(code, message, options),
  store: (code, message, options) => new StoreError(code, message, options),
  protocol: (code, message, options) => new ProtocolError(code, message, options),
  checkpoint: (code, message, options) => new CheckpointError(code, message, options),
  restore: (code, message, options) => new RestoreError(code, message, options),
  disk: (code, message, options) => new DiskError(code, message, options),
  ha: (code, message, options) => new HaError(code, message, options),
  netns: (code, message, options) => new NetnsError(code, message, options),
  bench: (code, message, options) => new BenchError(code, message, options),
  net: (code, message, options) => new NetError(code, message, options),
  image: (code, message, options) => new ImageError(code, message, options),
  redis: (code, message, options) => new RedisClientError(code, message, options),
};

const FAMILY_OF = new Map<string, ErrorFamily>(
  (Object.keys(ERROR_CODES) as ErrorFamily[]).flatMap((f) => ERROR_CODES[f].map((c): [string, ErrorFamily] => [c, f])),
);

export function isHydraCode(code: unknown): code is HydraCode {
  return typeof code === 'string' && FAMILY_OF.has(code);
}

export function familyOf(code: HydraCode): ErrorFamily {
  return FAMILY_OF.get(code)!;
}

/**
 * The error of `code`'s family. A code this build does not know (a newer
 * peer's) becomes HYDRA_STORE_INTERNAL with the foreign code in the message.
 */
export function errorFromCode(code: string, message: string, options?: Options): HydraError {
  const family = FAMILY_OF.get(code);
  if (!family) return new StoreError('HYDRA_STORE_INTERNAL', `${code}: ${message}`, options);
  return (FAMILY_ERROR[family] as (code: string, message: string, options?: Options) => HydraError)(code, message, options);
}

/** Wrap a failed I/O call so the message names the step and the subject. */
export function ioStepError(step: string, subject: string, err: unknown): IoError {
  const e = err as NodeJS.ErrnoException;
  const code = e?.code === 'ENOSPC' ? 'HYDRA_IO_NO_SPACE' : e?.code === 'EROFS' || e?.code === 'EACCES' ? 'HYDRA_IO_READ_ONLY' : 'HYDRA_IO_FAILED';
  return new IoError(code, `${step} ${subject}: ${e?.message ?? String(err)}`, { cause: err });
}

