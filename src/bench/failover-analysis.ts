// The fail-over benchmark's analysis: time splits, speedups against the baselines, paging, slowdown, and the targets met.
import { summary, type Summary } from './harness.js';
import type { QemuBaseline, RunResult } from './failover-results.js';

/** The median of the numbers among `xs` (null when there are none). */
export const med = (xs: (number | null | undefined)[]): number | null => summary(xs.filter((v): v is number => typeof v === 'number')).median;
export const pick = (rs: RunResult[], f: (r: RunResult) => number | null | undefined) => rs.map(f);

export function analyseFailover(runs: RunResult[], qemu: QemuBaseline | undefined) {
  const file = runs.filter((r) => r.mode === 'file');
  const net = runs.filter((r) => r.mode === 'network' && r.prefetch);
  const nopf = runs.filter((r) => r.mode === 'network' && !r.prefetch);
  const groups: [string, RunResult[]][] = [['file', file], ['network', net]];

  const split = (rs: RunResult[]) => ({
    n: rs.length,
    detectMs: summary(rs.map((r) => r.detectMs)),
    goneMs: summary(rs.map((r) => r.goneMs)),
    prepareMs: summary(rs.map((r) => r.restore.prepareMs)),
    spawnMs: summary(rs.map((r) => r.restore.spawnMs)),
    deviceLoadMs: summary(rs.map((r) => r.restore.deviceLoadMs)),
    spawnToRunningMs: summary(rs.map((r) => r.restore.spawnToRunningMs)),
    launchToRunningMs: summary(rs.map((r) => r.restore.launchToRunningMs)),
    restoreTotalMs: summary(rs.map((r) => r.restore.totalMs)),
    killToRunningMs: summary(rs.map((r) => r.killToRunningMs)),
    killToProgressMs: summary(rs.map((r) => r.killToProgressMs).filter((v): v is number => v !== null)),
  });
  const splits: Record<string, ReturnType<typeof split>> = { file: split(file), network: split(net) };
  if (nopf.length) splits['network-noprefetch'] = split(nopf);

  const bootMs = summary(runs.map((r) => r.bootMs).concat(qemu ? [qemu.bootMs] : []));
  const speedup = (rs: RunResult[]) => {
    const m = med(pick(rs, (r) => r.restore.spawnToRunningMs));
    return qemu && m ? qemu.spawnToRunningMs / m : null;
  };
  const loadSpeedup = (rs: RunResult[]) => {
    const m = med(pick(rs, (r) => r.restore.deviceLoadMs));
    return qemu && m ? qemu.loadMs / m : null;
  };
  const coldSpeedup = (rs: RunResult[]) => {
    const m = med(pick(rs, (r) => r.restore.spawnToRunningMs));
    return qemu?.cold && m ? qemu.cold.spawnToRunningMs / m : null;
  };
  const supervisorMs = (r: RunResult) => r.restore.launchToRunningMs - r.restore.spawnToRunningMs;
  const pfFaults = med(pick(net, (r) => r.pager?.faults));
  const npFaults = med(pick(nopf, (r) => r.pager?.faults));
  const faultRatio = pfFaults !== null && npFaults !== null ? npFaults / Math.max(1, pfFaults) : null;

  const unfailed = med(pick(runs, (r) => r.stepsPerSBefore));
  const slowRows: [string, RunResult[]][] = [['network + prefetch', net], ['network, no prefetch', nopf], ['file', file]];
  const slowdown = slowRows.map(([label, rs]) => {
    const after = med(pick(rs, (r) => r.stepsPerSAfter));
    const before = med(pick(rs, (r) => r.stepsPerSBefore));
    return { config: label, runs: rs.length, stepsPerSBefore: before, stepsPerSAfter: after, unfailedAll: unfailed, slowdownPct: after !== null && unfailed ? (1 - after / unfailed) * 100 : null };
  });

  const allS2R = runs.filter((r) => r.prefetch).map((r) => r.restore.spawnToRunningMs);
  const targets = [
    { target: 'spawn to running < 150 ms (file)', value: splits.file!.spawnToRunningMs.median, unit: 'ms', met: (splits.file!.spawnToRunningMs.median ?? Infinity) < 150 },
    { target: 'spawn to running < 150 ms (network)', value: splits.network!.spawnToRunningMs.median, unit: 'ms', met: (splits.network!.spawnToRunningMs.median ?? Infinity) < 150 },
    { target: 'spawn to running < 150 ms (every run)', value: allS2R.length ? Math.max(...allS2R) : null, unit: 'ms (max)', met: allS2R.every((v) => v < 150) },
    { target: 'QEMU death to running restored VM < 1 s (file)', value: splits.file!.killToRunningMs.median, unit: 'ms', met: (splits.file!.killToRunningMs.median ?? Infinity) < 1000 },
    { target: 'QEMU death to running restored VM < 1 s (network)', value: splits.network!.killToRunningMs.median, unit: 'ms', met: (splits.network!.killToRunningMs.median ?? Infinity) < 1000 },
    { target: 'slim restore >= 10x faster than QEMU full restore (file)', value: speedup(file), unit: 'x', met: (speedup(file) ?? 0) >= 10 },
    { target: 'slim restore >= 10x faster than QEMU full restore (network)', value: speedup(net), unit: 'x', met: (speedup(net) ?? 0) >= 10 },
    { target: 'slim restore >= 10x faster than QEMU full restore from a cold page cache (file)', value: coldSpeedup(file), unit: 'x', met: (coldSpeedup(file) ?? 0) >= 10 },
    { target: 'slim restore >= 10x faster than QEMU full restore from a cold page cache (network)', value: coldSpeedup(net), unit: 'x', met: (coldSpeedup(net) ?? 0) >= 10 },
    { target: 'prefetch cuts demand faults >= 5x', value: faultRatio, unit: 'x', met: (faultRatio ?? 0) >= 5 },
  ];

  return { file, net, nopf, groups, splits, bootMs, speedup, loadSpeedup, coldSpeedup, supervisorMs, pfFaults, npFaults, faultRatio, unfailed, slowdown, targets };
}

export type FailoverAnalysis = ReturnType<typeof analyseFailover>;
