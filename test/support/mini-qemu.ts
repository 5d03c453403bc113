// A bare QEMU (no devices, no kernel) with the shim preloaded, for the native-layer tests.
/**
 * A bare QEMU (q35, memfd RAM, no devices, no kernel; SeaBIOS writes some
 * RAM after `cont`) with the shim preloaded, driven through the real QMP client.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import path from 'node:path';
import { shimPath } from '../../src/native/index.js';
import { connectWhenReady, type QmpClient } from '../../src/qmp/index.js';
import { sleep } from '../../src/util/sleep.js';
import { tmpDir } from './tmp.js';

export const QEMU = 'qemu-system-x86_64';
export function haveQemu(): boolean {
  return spawnSync(QEMU, ['--version'], { stdio: 'ignore' }).status === 0;
}

/** Host address of a RAM block by id (HMP "info ramblock", column HVA). */
export async function ramBlockHva(qmp: QmpClient, id: string): Promise<number> {
  const text = await qmp.execute<string>('human-monitor-command', { 'command-line': 'info ramblock' });
  for (const line of text.split('\n')) {
    // Block Name, PSize ("4 KiB": two words), Offset, Used, Total, HVA, RO
    const f = line.trim().split(/\s+/);
    if (f[0] === id) return parseInt(f[6]!, 16);
  }
  throw new Error(`no RAM block ${id} in:\n${text}`);
}

export interface MiniVm {
  pid: number;
  qmp: QmpClient;
  proc?: ChildProcess;
  kill(): Promise<void>;
}

/** Start QEMU paused (-S) with the shim; daemonize: QEMU forks into the background (-daemonize). */
/** privateFile: guest RAM is a private mapping of that file (memory-backend-file share=off, a file-mode restore's RAM). */
export async function startMiniVm(opts: { ramMiB?: number; daemonize?: boolean; privateFile?: string } = {}): Promise<MiniVm> {
  const dir = tmpDir('qemu');
  const sock = path.join(dir, 'qmp.sock');
  const pidfile = path.join(dir, 'qemu.pid');
  const args = [
    '-machine', 'q35,memory-backend=ram0', '-object',
    opts.privateFile !== undefined
      ? `memory-backend-file,id=ram0,size=${opts.ramMiB ?? 128}M,mem-path=${opts.privateFile},share=off`
      : `memory-backend-memfd,id=ram0,size=${opts.ramMiB ?? 128}M`,
    '-accel', 'tcg', '-nodefaults', '-display', 'none', '-S', '-qmp', `unix:${sock},server=on,wait=off`,
    ...(opts.daemonize ? ['-daemonize', '-pidfile', pidfile] : ['-nographic']),
  ];
  const env = { ...process.env, LD_PRELOAD: shimPath };
  let proc: ChildProcess | undefined;
  let pid: number;
  if (opts.daemonize) {
    const r = spawnSync(QEMU, args, { env, encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`qemu -daemonize failed: ${r.stderr}`);
    pid = Number(readFileSync(pidfile, 'utf8').trim());
  } else {
    proc = spawn(QEMU, args, { env, stdio: ['ignore', 'ignore', 'pipe'] });
    pid = proc.pid!;
  }
  const qmp = await connectWhenReady(sock, { label: 'test QEMU', deadlineMs: 10_000 });
  const exited = proc ? new Promise<void>((r) => proc!.once('exit', () => r())) : undefined;
  return {
    pid, qmp, proc,
    async kill() {
      qmp.close();
      try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
      if (exited) await exited;
      else for (let i = 0; i < 100 && existsSync(`/proc/${pid}`); i++) await sleep(20);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
