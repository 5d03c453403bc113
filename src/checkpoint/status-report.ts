import { Registry, Gauge } from 'prom-client';
import { listVmNames, readState, isLive } from '../vm/index.js';
import { readProtection } from './protection.js';
import { pidAlive } from '../util/pid.js';

export interface StatusRow {
  vm: string;
  vmState: string;
  protection: string | null;
  reason: string | null;
  store: string | null;
  generation: number | null;
  epoch: number | null;
  ageMs: number | null;
  configuredIntervalMs: number | null;
  achievedIntervalMs: number | null;
  lastPauseMs: number | null;
  medianPauseMs: number | null;
  p99PauseMs: number | null;
  bytesPerCheckpoint: number | null;
  lastCommitMs: number | null;
  lastDiskFreezeMs: number | null;
  diskChainLength: number | null;
}

/** One row per VM on this host, from the files its supervisor and checkpointer keep. */
export function collectStatus(now = Date.now()): StatusRow[] {
  return listVmNames().map((vm) => {
    const st = readState(vm);
    const p = readProtection(vm);
    const running = p && pidAlive(p.pid);
    return {
      vm,
      vmState: st ? (isLive(st) ? st.lifecycle : st.lifecycle === 'running' ? 'crashed' : st.lifecycle) : 'unknown',
      protection: p ? (running || p.state === 'failed' || p.state === 'stopped' ? p.state : 'dead') : null,
      reason: p?.reason ?? null,
      store: p?.store ?? null,
      generation: p?.generation ?? null,
      epoch: p?.committedEpoch ?? null,
      ageMs: p?.lastCommitAt ? now - p.lastCommitAt : null,
      configuredIntervalMs: p?.configuredIntervalMs ?? null,
      achievedIntervalMs: p?.recent.medianIntervalMs ?? null,
      lastPauseMs: p?.last?.pauseMs ?? null,
      medianPauseMs: p?.recent.medianPauseMs ?? null,
      p99PauseMs: p?.recent.p99PauseMs ?? null,
      bytesPerCheckpoint: p?.recent.medianBytes ?? p?.last?.bytes ?? null,
      lastCommitMs: p?.last?.commitMs ?? null,
      lastDiskFreezeMs: p?.last?.diskMs ?? null,
      diskChainLength: p?.last?.diskChainLength ?? null,
    };
  });
}

/** The same numbers as Prometheus metrics. */
export async function renderPrometheus(rows: StatusRow[]): Promise<string> {
  const registry = new Registry();
  const g = (name: string, help: string) => new Gauge({ name, help, labelNames: ['vm'], registers: [registry] });
  const epoch = g('hydravm_checkpoint_epoch', 'Newest committed checkpoint epoch');
  const age = g('hydravm_checkpoint_age_seconds', 'Age of the newest committed checkpoint');
  const interval = g('hydravm_checkpoint_interval_seconds', 'Achieved checkpoint interval (median of recent)');
  const configured = g('hydravm_checkpoint_configured_interval_seconds', 'Configured checkpoint interval');
  const pause = g('hydravm_checkpoint_pause_seconds', 'VM pause of the last checkpoint');
  const pauseMed = g('hydravm_checkpoint_pause_median_seconds', 'Median VM pause of recent checkpoints');
  const bytesG = g('hydravm_checkpoint_bytes', 'Bytes of guest memory per checkpoint (median of recent)');
  const commit = g('hydravm_checkpoint_commit_seconds', 'Time from end of sending to durable acknowledgement, last checkpoint');
  const protectedG = g('hydravm_vm_protected', '1 while the VM has a live checkpointer');
  const freeze = g('hydravm_checkpoint_disk_freeze_seconds', 'Part of the last pause spent freezing the disk layers');
  const chain = g('hydravm_disk_chain_length', 'Layers in the longest disk chain');
  for (const r of rows) {
    const l = { vm: r.vm };
    protectedG.set(l, r.protection === 'protected' ? 1 : 0);
    if (r.epoch !== null) epoch.set(l, r.epoch);
    if (r.ageMs !== null) age.set(l, r.ageMs / 1000);
    if (r.achievedIntervalMs !== null) interval.set(l, r.achievedIntervalMs / 1000);
    if (r.configuredIntervalMs !== null) configured.set(l, r.configuredIntervalMs / 1000);
    if (r.lastPauseMs !== null) pause.set(l, r.lastPauseMs / 1000);
    if (r.medianPauseMs !== null) pauseMed.set(l, r.medianPauseMs / 1000);
    if (r.bytesPerCheckpoint !== null) bytesG.set(l, r.bytesPerCheckpoint);
    if (r.lastCommitMs !== null) commit.set(l, r.lastCommitMs / 1000);
    if (r.lastDiskFreezeMs !== null) freeze.set(l, r.lastDiskFreezeMs / 1000);
    if (r.diskChainLength !== null) chain.set(l, r.diskChainLength);
  }
  return registry.metrics();
}
