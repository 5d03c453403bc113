// The agent's view of etcd: every VM record, kept current by a watch and a periodic resync, and this host's assignments.
import type { Watcher, IKeyValue } from 'etcd3';
import { sleep } from '../util/sleep.js';
import type { AgentCore } from './agent-core.js';
import { keys, type Assignment, type VmRecord } from './cluster.js';
import { parseAssignment } from './assignment-schema.js';

export interface ViewHooks {
  /** Kill every local copy the records say is stale. */
  fenceStale(): Promise<void>;
  /** An assignment for this host appeared (or is still there at a resync). */
  assignment(a: Assignment, modRevision: string): void;
}

export class EtcdView {
  /** Last known VM records (from etcd). */
  records = new Map<string, VmRecord>();
  /** Whether etcd has been read at least once. */
  loaded = false;
  private watchers: Watcher[] = [];
  private resyncing = false;
  /** Malformed assignments already logged, by key: their mod revision. */
  private refused = new Map<string, string>();

  constructor(private readonly core: AgentCore, private readonly hooks: ViewHooks) {}

  /** Watch VM records and this host's assignments; retried while etcd is unreachable. */
  async startWatches(): Promise<void> {
    const { core } = this;
    const onVm = (kv: IKeyValue, deleted: boolean) => {
      const name = kv.key.toString().slice(keys.vmsPrefix.length);
      if (deleted) this.records.delete(name);
      else {
        try {
          this.records.set(name, JSON.parse(kv.value.toString()) as VmRecord);
        } catch {
          return; // not a record this version writes; the next resync reads what is there
        }
      }
      void core.tick();
    };
    const onAssignment = (kv: IKeyValue) => this.offer(kv);
    try {
      const w1 = await core.cluster.etcd.watch().prefix(keys.vmsPrefix).create();
      w1.on('put', (kv) => onVm(kv, false));
      w1.on('delete', (kv) => onVm(kv, true));
      w1.on('connected', () => void this.resync());
      // The watcher reconnects by itself and 'connected' resyncs; the error needs no handling.
      w1.on('error', () => undefined);
      const w2 = await core.cluster.etcd.watch().prefix(keys.hostAssignmentsPrefix(core.host)).only('put').create();
      w2.on('put', onAssignment);
      w2.on('connected', () => void this.resync());
      w2.on('error', () => undefined);
      this.watchers.push(w1, w2);
      // Stopped while the watches were being created: drop them; a failed cancel dies with the client.
      if (!core.running()) void Promise.all([w1.cancel(), w2.cancel()]).catch(() => undefined);
    } catch (err) {
      // etcd unreachable at start: the periodic resync covers us; retry the watches later.
      core.log.warn({ err: (err as Error).message }, 'cannot watch etcd yet');
      if (core.running()) setTimeout(() => void this.startWatches(), 500);
    }
  }

  /** Re-read every VM record and this host's assignments; fence and run what they say. */
  async resync(throwErrors = false): Promise<void> {
    if (this.resyncing && !throwErrors) return;
    this.resyncing = true;
    try {
      const vms = await this.core.cluster.vms();
      this.records = new Map([...vms].map(([k, v]) => [k, v.value]));
      this.loaded = true;
      await this.hooks.fenceStale();
      const asg = await this.core.cluster.etcd.getAll().prefix(keys.hostAssignmentsPrefix(this.core.host)).exec();
      for (const kv of asg.kvs) this.offer(kv);
    } catch (err) {
      if (throwErrors) throw err;
      // Otherwise etcd is unreachable: the next resync (every second) tries again.
    } finally {
      this.resyncing = false;
    }
  }

  /** Hand a valid assignment to the agent; a malformed one is refused and logged (once per revision), never run. */
  private offer(kv: IKeyValue): void {
    const key = kv.key.toString();
    let a: Assignment;
    try {
      a = parseAssignment(kv.value.toString(), this.core.host, key.slice(keys.hostAssignmentsPrefix(this.core.host).length));
    } catch (err) {
      if (this.refused.get(key) !== kv.mod_revision) {
        this.refused.set(key, kv.mod_revision);
        this.core.log.error({ key, err: (err as Error).message }, 'refusing a malformed assignment');
        this.core.emit('assignment-refused', { key, error: (err as Error).message });
      }
      return;
    }
    this.hooks.assignment(a, kv.mod_revision);
  }

  /** Cancel the watches (bounded: etcd may be gone). */
  async close(): Promise<void> {
    await Promise.race([
      // A cancel that fails leaves a watcher of a client that is closed next.
      Promise.all(this.watchers.map((w) => w.cancel().catch(() => undefined))),
      sleep(1000),
    ]);
    this.watchers = [];
  }
}
