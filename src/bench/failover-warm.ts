// The fail-over bench's warm-versus-cold table: restores into a pre-started restore shell against cold QEMU starts, split by step.
import type { RunResult } from './failover-results.js';

function median(xs: number[]): number | null {
  if (xs.length === 0) return null;
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

const f = (x: number | null | undefined) => (x === null || x === undefined ? '—' : x < 10 ? x.toFixed(1) : String(Math.round(x)));

interface Row {
  mode: string;
  kind: 'warm' | 'cold';
  n: number;
  detect: number | null;
  /** SIGKILL until the dead VM's supervisor is gone too (the restore starts then). */
  gone: number | null;
  /** Of prepare: registering the new generation at the store (the fence). */
  fence: number | null;
  prepare: number | null;
  /** Warm: adopting the shell, disks, pager. Cold: supervisor + QEMU start to QMP, then the pager. */
  launch: number | null;
  deviceLoad: number | null;
  cont: number | null;
  launchToRunning: number | null;
  killToRunning: number | null;
  killToRunningMax: number | null;
  violations: number;
  misses: string[];
}

/**
 * One row per memory mode and start kind, medians over the runs: SIGKILL to
 * `crashed` recorded (detect), restore preparation (fence, metadata, device
 * state, disks), the launch (warm: shell hand-off; cold: supervisor and QEMU
 * start), device load, `cont`, and end to end. A warm run that found no shell
 * counts as cold and names why.
 */
export function renderWarmCold(runs: RunResult[]): { markdown: string; json: Row[] } {
  const rows: Row[] = [];
  for (const mode of ['file', 'network'] as const) {
    for (const kind of ['cold', 'warm'] as const) {
      const rs = runs.filter((r) => r.mode === mode && r.prefetch && (r.restore.warm === 1) === (kind === 'warm'));
      if (rs.length === 0) continue;
      const launch = rs.map((r) => r.restore.launchToRunningMs - r.restore.deviceLoadMs - r.restore.contMs);
      rows.push({
        mode, kind, n: rs.length,
        detect: median(rs.map((r) => r.detectMs)),
        gone: median(rs.map((r) => r.goneMs)),
        fence: median(rs.flatMap((r) => (r.restore.fenceMs !== undefined ? [r.restore.fenceMs] : []))),
        prepare: median(rs.map((r) => r.restore.prepareMs)),
        launch: median(launch),
        deviceLoad: median(rs.map((r) => r.restore.deviceLoadMs)),
        cont: median(rs.map((r) => r.restore.contMs)),
        launchToRunning: median(rs.map((r) => r.restore.launchToRunningMs)),
        killToRunning: median(rs.map((r) => r.killToRunningMs)),
        killToRunningMax: Math.max(...rs.map((r) => r.killToRunningMs)),
        violations: rs.reduce((s, r) => s + r.violations, 0),
        misses: rs.filter((r) => r.warm && r.shellMiss).map((r) => `${r.vm}: ${r.shellMiss}`),
      });
    }
  }
  const lines = [
    '## Warm restore shells versus cold starts',
    '',
    'Medians in ms (kill → running also its maximum). Warm: the restore adopts a restore shell started before the failure',
    '(supervisor + QEMU waiting with `-incoming defer`, memfd RAM, placeholder disks); launch = hand-off (adopt, disks, pager attach).',
    'Cold: launch = supervisor start + QEMU spawn to QMP + pager attach. No HA manager runs here, so there is no assign step:',
    'the restore is called as soon as the dead VM\'s supervisor is gone. Prepare: fence (register the new generation at the',
    'store, durable), pinned meta, device state; file mode also waits until the epoch is in the image file.',
    '',
    '| mode | start | runs | detect | supervisor gone | prepare | of which fence | launch | device load | cont | launch → running | kill → running (median / max) | violations |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|---|',
    ...rows.map((r) => `| ${r.mode} | ${r.kind} | ${r.n} | ${f(r.detect)} | ${f(r.gone)} | ${f(r.prepare)} | ${f(r.fence)} | ${f(r.launch)} | ${f(r.deviceLoad)} | ${f(r.cont)} | ${f(r.launchToRunning)} | ${f(r.killToRunning)} / ${f(r.killToRunningMax)} | ${r.violations} |`),
  ];
  const misses = rows.flatMap((r) => r.misses);
  if (misses.length > 0) lines.push('', 'Warm runs that found no shell (counted as cold):', ...misses.map((m) => `- ${m}`));
  return { markdown: lines.join('\n') + '\n', json: rows };
}
