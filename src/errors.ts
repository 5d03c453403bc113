/**
 * Every error HydraVM raises on purpose. Each has a literal `code` a script can
 * match on, a message that names the VM / file / step involved, and a `cause`
 * when it wraps a lower-level error. Add new errors here, never ad hoc.
 */
export class HydraError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

/** Bad user input: a spec, a flag, a name. */
export class SpecError extends HydraError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('HYDRA_SPEC_INVALID', message, options);
  }
}

export class VmExistsError extends HydraError {
  constructor(name: string) {
    super('HYDRA_VM_EXISTS', `VM "${name}" is already running`);
  }
}

export class VmNotFoundError extends HydraError {
  constructor(name: string) {
    super('HYDRA_VM_NOT_FOUND', `no VM named "${name}"`);
  }
}

export class QemuError extends HydraError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('HYDRA_QEMU_FAILED', message, options);
  }
}

export class QmpError extends HydraError {
  /** QMP's own error class, e.g. "GenericError", when QEMU answered with an error. */
  readonly qmpClass: string | undefined;
  constructor(message: string, qmpClass?: string, options?: { cause?: unknown }) {
    super('HYDRA_QMP_ERROR', message, options);
    this.qmpClass = qmpClass;
  }
}

export class QmpTimeoutError extends HydraError {
  constructor(message: string) {
    super('HYDRA_QMP_TIMEOUT', message);
  }
}

export class QmpClosedError extends HydraError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('HYDRA_QMP_CLOSED', message, options);
  }
}

export class SetupError extends HydraError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('HYDRA_SETUP_FAILED', message, options);
  }
}

/** The native addon or shim is missing or the kernel lacks a feature it needs. */
export class NativeError extends HydraError {
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

export class TrackerError extends HydraError {
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

export class StoreError extends HydraError {
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

export class ProtocolError extends HydraError {
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

export class CheckpointError extends HydraError {
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

export class RestoreError extends HydraError {
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

/** Wrap a failed I/O call so the message names the step and the subject. */
export function ioStepError(step: string, subject: string, err: unknown): StoreError {
  const e = err as NodeJS.ErrnoException;
  const code = e?.code === 'ENOSPC' ? 'HYDRA_IO_NO_SPACE' : e?.code === 'EROFS' || e?.code === 'EACCES' ? 'HYDRA_IO_READ_ONLY' : 'HYDRA_IO_FAILED';
  return new StoreError(code, `${step} ${subject}: ${e?.message ?? String(err)}`, { cause: err });
}

/**
 * VM networking on this host:
 *   HYDRA_NET_BRIDGE_MISSING   a NIC names a bridge that does not exist (or is not a bridge) on this host
 *   HYDRA_NET_TAP_PERMISSION   creating or attaching the tap device needs CAP_NET_ADMIN and /dev/net/tun
 *   HYDRA_NET_TAP_BUSY         the tap name is held open by another process (another VM)
 *   HYDRA_NET_TAP_FAILED       `ip` failed to create, attach or remove a tap for another reason
 *   HYDRA_NET_MAC_CLASH        another running VM on this host already uses the MAC or the tap name
 */
export class NetError extends HydraError {
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

/**
 * Guest images (`hydravm image build`):
 *   HYDRA_IMAGE_NO_SPACE       not enough free space in the cache directory for the build
 *   HYDRA_IMAGE_BUILD_FAILED   a build step (mmdebstrap, mkfs.ext4, qemu-img) failed
 *   HYDRA_IMAGE_BAD_ARGS       unknown distribution, bad size or package name
 */
export class ImageError extends HydraError {
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

/**
 * The redis client that watches a VM's service from outside (src/bench/redis-watcher.ts):
 *   HYDRA_REDIS_CONNECT    the TCP connection to redis failed
 *   HYDRA_REDIS_TIMEOUT    connecting or a command took longer than its deadline
 *   HYDRA_REDIS_CLOSED     the connection closed before the reply came
 *   HYDRA_REDIS_ERROR      redis answered with an error reply
 *   HYDRA_REDIS_PROTOCOL   the reply was not RESP
 *   HYDRA_REDIS_BUSY       a second command was sent while one was in flight (a bug in the caller)
 */
export class RedisClientError extends HydraError {
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}
