// A QEMU with qcow2 disks and the test guest, started directly (no supervisor), for the disk tests.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { buildQemuArgs } from '../../src/vm/qemu-args.js';
import type { VmSpec } from '../../src/vm/spec.js';
import { connectWhenReady, type QmpClient } from '../../src/qmp/index.js';

export { tmpDir } from './tmp.js';
export { sleep } from '../../src/util/sleep.js';

/**
 * Test harness for the disk tests: QEMU started directly with the project's
 * own command line (buildQemuArgs), a QMP client on the checkpointer's socket,
 * helpers to write deterministic data through the guest's device (HMP
 * qemu-io on the virtio-blk backend) and to read a layer's disk content.
 */
export const GUEST_DIR = path.join(process.env.HYDRAVM_CACHE ?? path.join(os.homedir(), '.cache', 'hydravm'), 'guest');
export const KERNEL = path.join(GUEST_DIR, 'vmlinuz');
export const INITRD = path.join(GUEST_DIR, 'initrd.img');

export function guestAvailable(): boolean {
  return fs.existsSync(KERNEL) && fs.existsSync(INITRD);
}

export function sh(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status}): ${r.stderr}`);
  return r.stdout;
}

export function createQcow2(file: string, size = '8M', backing?: string): void {
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', ...(backing ? ['-b', backing, '-F', 'qcow2'] : []), file, size]);
}

export interface Vm {
  proc: ChildProcess;
  qmp: QmpClient;
  dir: string;
  serialLog: string;
  /** Block backend qdev path of disk i, for HMP qemu-io. */
  qdev(i: number): string;
  write(i: number, pattern: number, offset: number, length: number): Promise<void>;
  kill(): Promise<void>;
  stderr(): string;
}

export interface StartOptions {
  dir: string;
  name?: string;
  disks: string[];
  /** Boot the test guest with this command line; without it QEMU stays stopped (-S) with no guest code. */
  cmdline?: string;
  memoryMb?: number;
  /** Guest RAM in a shared file (so a test can copy it during a pause). */
  ramShareFile?: string;
  /** Restore: RAM from this file, private mapping. */
  ramPrivateFile?: string;
  incoming?: boolean;
  readOnlyDisks?: boolean;
}

export async function startQemu(o: StartOptions): Promise<Vm> {
  const name = o.name ?? 'dt';
  const spec: VmSpec = {
    name,
    memoryBytes: (o.memoryMb ?? 64) * 1024 * 1024,
    vcpus: 1,
    accel: 'tcg',
    kernel: KERNEL,
    initrd: INITRD,
    cmdline: o.cmdline ?? 'console=ttyS0',
    disks: o.disks.map((p) => ({ path: p })),
  };
  const paths = {
    qmpSocket: path.join(o.dir, `${name}-user.sock`),
    supervisorQmpSocket: path.join(o.dir, `${name}-sup.sock`),
    hydraQmpSocket: path.join(o.dir, `${name}-hydra.sock`),
    serialLog: path.join(o.dir, `${name}-serial.log`),
  };
  for (const s of [paths.qmpSocket, paths.supervisorQmpSocket, paths.hydraQmpSocket]) fs.rmSync(s, { force: true });
  let args = buildQemuArgs(spec, paths, {
    accel: 'tcg',
    ram: o.ramPrivateFile ? { kind: 'file-private', path: o.ramPrivateFile } : { kind: 'memfd' },
    incomingDefer: o.incoming,
    diskFiles: o.disks,
  });
  if (o.ramShareFile) {
    args = args.map((a) => a.startsWith('memory-backend-memfd,') ? `memory-backend-file,id=ram0,size=${spec.memoryBytes / 1048576}M,mem-path=${o.ramShareFile},share=on` : a);
  }
  if (o.readOnlyDisks) {
    args = args.map((a) => a.startsWith('driver=qcow2,file=disk') ? `${a},read-only=on` : a.startsWith('driver=file,filename=') ? `${a},read-only=on` : a);
  }
  if (!o.cmdline) {
    // No guest: drop kernel/initrd/append, stay stopped.
    const out: string[] = [];
    for (let i = 0; i < args.length; i++) {
      if (['-kernel', '-initrd', '-append'].includes(args[i]!)) { i++; continue; }
      out.push(args[i]!);
    }
    args = [...out, '-S'];
  }
  const proc = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  proc.stderr!.on('data', (d) => { err += d; });
  let exited = false;
  proc.on('exit', () => { exited = true; });
  let qmp: QmpClient;
  try {
    qmp = await connectWhenReady(paths.hydraQmpSocket, { label: `test VM ${name}`, deadlineMs: 10_000, isAlive: () => !exited });
  } catch (e) {
    proc.kill('SIGKILL');
    throw new Error(`QEMU did not start: ${(e as Error).message}\n${err}`);
  }
  const qdevs: string[] = [];
  const blocks = await qmp.execute<{ qdev: string; inserted?: { 'node-name': string } }[]>('query-block');
  for (const b of blocks) if (b.inserted) qdevs.push(b.qdev);
  const vm: Vm = {
    proc, qmp, dir: o.dir, serialLog: paths.serialLog,
    qdev: (i) => qdevs[i]!,
    async write(i, pattern, offset, length) {
      const out = await qmp.execute<string>('human-monitor-command', { 'command-line': `qemu-io -d ${qdevs[i]} "write -P ${pattern} ${offset} ${length}"` });
      if (out.trim()) throw new Error(`qemu-io write: ${out}`);
    },
    async kill() {
      qmp.close();
      if (!exited) {
        const done = new Promise((r) => proc.once('exit', r));
        proc.kill('SIGKILL');
        await done;
      }
    },
    stderr: () => err,
  };
  return vm;
}

/** The disk content seen through `file`'s chain, as raw bytes. */
export function readDisk(file: string, dir: string): Buffer {
  const out = path.join(dir, `read-${process.pid}-${Math.random().toString(36).slice(2)}.raw`);
  sh('qemu-img', ['convert', '-U', '-O', 'raw', file, out]);
  const data = fs.readFileSync(out);
  fs.rmSync(out, { force: true });
  return data;
}

export function chainOf(file: string): string[] {
  const info = JSON.parse(sh('qemu-img', ['info', '-U', '--backing-chain', '--output=json', file])) as { filename: string }[];
  return info.map((i) => i.filename);
}

export function median(xs: number[]): number {
  const s = xs.slice().sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

export function percentile(xs: number[], p: number): number {
  const s = xs.slice().sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)]!;
}

