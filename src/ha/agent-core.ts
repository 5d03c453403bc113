// What the parts of a host agent (lease, etcd view, death watch, assignments) share.
import type { Logger } from 'pino';
import type { Cluster } from './cluster.js';

export interface AgentEvents {
  registered: [{ leaseId: string }];
  reported: [{ vm: string; state: string; generation: number; detectedAt: number; failedAt: number }];
  fenced: [{ vm: string; reason: string; self: boolean }];
  'self-fence': [{ silentMs: number }];
  /** The manager's host-dead verdict on this host was cleared (every VM of the old incarnation is dead). */
  revived: [{ revision: string }];
  restored: [{ vm: string; generation: number }];
  'restore-failed': [{ vm: string; generation: number; error: string }];
  protected: [{ vm: string; generation: number }];
  'assignment-refused': [{ key: string; error: string }];
}

/** The agent as its parts see it: identity, etcd, and the few actions they ask of each other. */
export interface AgentCore {
  readonly host: string;
  readonly home: string;
  readonly cluster: Cluster;
  readonly log: Logger;
  running(): boolean;
  emit<K extends keyof AgentEvents>(event: K, ...args: AgentEvents[K]): void;
  /** Run the local loop now (a VM record or file changed). */
  tick(): Promise<void>;
  /** Re-read etcd, fence and run assignments; `throwErrors` for the caller that must know. */
  resync(throwErrors?: boolean): Promise<void>;
  /** Kill a local copy (once at a time per VM). */
  fence(vm: string, reason: string, self: boolean): Promise<void>;
}
