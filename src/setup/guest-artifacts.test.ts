import { before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { ensureGuestArtifacts, guestArtifactsStatus, runCommand, type GuestArtifacts } from './guest-artifacts.js';
import { checkSetup } from './index.js';

// Uses the normal cache (HYDRAVM_CACHE or ~/.cache/hydravm) so repeated runs
// do not download the kernel again.

let artifacts: GuestArtifacts;

interface Booted {
  child: ChildProcess;
  logPath: string;
  startedAt: number;
  read(): Promise<string>;
  waitFor(re: RegExp, timeoutMs: number): Promise<{ match: RegExpExecArray; ms: number }>;
  stop(): Promise<void>;
}

async function boot(append: string, extra: string[] = [], kernel?: string): Promise<Booted> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'hydra-guest-test-'));
  const logPath = path.join(dir, 'serial.log');
  const args = [
    '-accel', 'tcg', '-m', '512', '-nodefaults', '-nographic', '-no-reboot',
    '-serial', `file:${logPath}`,
    '-kernel', kernel ?? artifacts.kernel, '-initrd', artifacts.initrd,
    '-append', `console=ttyS0 quiet panic=-1 ${append}`,
    ...extra,
  ];
  const startedAt = Date.now();
  const child = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const read = () => fs.readFile(logPath, 'utf8').catch(() => '');
  return {
    child,
    logPath,
    startedAt,
    read,
    async waitFor(re, timeoutMs) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const match = re.exec(await read());
        if (match) return { match, ms: Date.now() - startedAt };
        if (child.exitCode !== null || child.signalCode !== null) {
          assert.fail(`QEMU exited (${child.exitCode ?? child.signalCode}) before ${re}: ${stderr}\n${await read()}`);
        }
        if (Date.now() > deadline) assert.fail(`timed out after ${timeoutMs} ms waiting for ${re}; serial log:\n${(await read()).slice(-3000)}`);
        await new Promise((r) => setTimeout(r, 200));
      }
    },
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        const gone = new Promise((r) => child.once('exit', r));
        child.kill('SIGTERM');
        await gone;
      }
      await fs.rm(dir, { recursive: true, force: true });
    },
  };
}

function steps(log: string): number[] {
  return [...log.matchAll(/^memcheck: step=(\d+) pages=\d+ gen_sum=\d+ violations=(\d+)/gm)].map((m) => Number(m[1]));
}

before(async () => {
  artifacts = await ensureGuestArtifacts({ log: (m) => console.log(m) });
}, { timeout: 10 * 60_000 });

test('guest artifacts are built', async () => {
  for (const f of [artifacts.kernel, artifacts.initrd]) {
    const st = await fs.stat(f);
    assert.ok(st.size > 100_000, `${f} is too small (${st.size})`);
  }
  const { stdout } = await runCommand('list initrd', 'bash', ['-c', 'set -o pipefail; zcat "$1" | cpio -t --quiet', 'x', artifacts.initrd]);
  const names = stdout.split('\n');
  for (const want of ['init', 'bin/busybox', 'bin/sh', 'bin/memcheck', 'bin/diskcheck', 'dev/console', 'lib/modules/virtio_blk.ko', 'lib/modules/virtio_ring.ko']) {
    assert.ok(names.includes(want), `initrd lacks ${want}`);
  }
  assert.equal((await guestArtifactsStatus()).ready, true);
  if (artifacts.vmlinux) {
    const { stdout: t } = await runCommand('file vmlinux', 'file', ['-b', artifacts.vmlinux]);
    assert.match(t, /^ELF 64-bit/);
  }
});

test('second ensureGuestArtifacts is fast and does not rebuild', async () => {
  const before = await fs.stat(artifacts.initrd);
  const t0 = performance.now();
  const again = await ensureGuestArtifacts({ log: (m) => assert.fail(`unexpected build step: ${m}`) });
  const ms = performance.now() - t0;
  assert.deepEqual(again, artifacts);
  assert.ok(ms < 500, `second call took ${ms} ms`);
  const after = await fs.stat(artifacts.initrd);
  assert.equal(after.mtimeMs, before.mtimeMs);
  assert.equal(after.ino, before.ino);
});

test('changed guest sources rebuild the initrd but reuse the kernel', { timeout: 5 * 60_000 }, async () => {
  // Work on a copy of the cache so the shared artifacts stay untouched.
  const tmpCache = await fs.mkdtemp(path.join(os.tmpdir(), 'hydra-cache-test-'));
  const saved = process.env.HYDRAVM_CACHE;
  try {
    await fs.cp(artifacts.dir, path.join(tmpCache, 'guest'), { recursive: true, filter: (src) => !path.basename(src).startsWith('.') });
    const stampPath = path.join(tmpCache, 'guest', 'stamp.json');
    const stamp = JSON.parse(await fs.readFile(stampPath, 'utf8'));
    stamp.sourcesHash = 'stale';
    await fs.writeFile(stampPath, JSON.stringify(stamp));
    process.env.HYDRAVM_CACHE = tmpCache;
    assert.equal((await guestArtifactsStatus()).ready, false);
    const logs: string[] = [];
    const rebuilt = await ensureGuestArtifacts({ log: (m) => logs.push(m) });
    assert.equal(rebuilt.dir, path.join(tmpCache, 'guest'));
    assert.ok(logs.some((l) => l.includes('compiling memcheck')), logs.join('\n'));
    assert.ok(!logs.some((l) => l.includes('downloading')), `kernel downloaded again:\n${logs.join('\n')}`);
    assert.equal((await guestArtifactsStatus()).ready, true);
  } finally {
    if (saved === undefined) delete process.env.HYDRAVM_CACHE;
    else process.env.HYDRAVM_CACHE = saved;
    await fs.rm(tmpCache, { recursive: true, force: true });
  }
});

test('checkSetup reports guest artifacts as present', async () => {
  const res = await checkSetup();
  assert.ok(!res.missing.some((m) => m.startsWith('guest artifacts')), res.missing.join('\n'));
});

test('guest boots under TCG and memcheck progresses', { timeout: 120_000 }, async () => {
  const vm = await boot('hydra.run=memcheck memcheck.mb=64 memcheck.rate=32 memcheck.seed=7');
  try {
    const ready = await vm.waitFor(/hydra-guest: ready run=memcheck/, 60_000);
    await vm.waitFor(/^memcheck: start mb=64 seed=7\b/m, 30_000);
    const first = await vm.waitFor(/^memcheck: step=\d+/m, 30_000);
    console.log(`boot: /init ready after ${ready.ms} ms, first memcheck step after ${first.ms} ms (spawn to line)`);
    const deadline = Date.now() + 30_000;
    let s: number[] = [];
    while (Date.now() < deadline) {
      s = steps(await vm.read());
      if (s.length >= 4) break;
      await new Promise((r) => setTimeout(r, 250));
    }
    assert.ok(s.length >= 4, `too few progress lines: ${s.join(',')}`);
    for (let i = 1; i < s.length; i++) assert.ok(s[i]! > s[i - 1]!, `step not increasing: ${s.join(',')}`);
    const log = await vm.read();
    assert.doesNotMatch(log, /MEMCHECK VIOLATION/);
    assert.match(log, /violations=0/);
  } finally {
    await vm.stop();
  }
});

test('uncompressed vmlinux (PVH) boots too', { timeout: 120_000 }, async (t) => {
  if (!artifacts.vmlinux) return t.skip('no vmlinux extracted');
  const vm = await boot('hydra.run=memcheck memcheck.mb=16 memcheck.rate=16', [], artifacts.vmlinux);
  try {
    const ready = await vm.waitFor(/hydra-guest: ready run=memcheck/, 60_000);
    const first = await vm.waitFor(/^memcheck: step=\d+/m, 30_000);
    console.log(`boot (vmlinux): /init ready after ${ready.ms} ms, first memcheck step after ${first.ms} ms`);
  } finally {
    await vm.stop();
  }
});

test('memcheck selftest corruption is detected', { timeout: 120_000 }, async () => {
  const vm = await boot('hydra.run=memcheck memcheck.mb=16 memcheck.rate=16 memcheck.corrupt=20', [], artifacts.vmlinux);
  try {
    const v = await vm.waitFor(/^MEMCHECK VIOLATION: page=(\d+) expected_index=\d+ found_index=\d+ expected_gen=(\d+) found_gen=(\d+) .*what=(\S+)/m, 90_000);
    assert.ok(v.match[4]);
    await vm.waitFor(/^memcheck: step=\d+ pages=\d+ gen_sum=\d+ violations=[1-9]/m, 30_000);
  } finally {
    await vm.stop();
  }
});

test('diskcheck writes and verifies records on a qcow2 virtio disk', { timeout: 120_000 }, async () => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'hydra-disk-test-'));
  const disk = path.join(dir, 'disk.qcow2');
  await runCommand('qemu-img create', 'qemu-img', ['create', '-q', '-f', 'qcow2', disk, '64M']);
  const vm = await boot('hydra.run=diskcheck diskcheck.rate=20', [
    '-blockdev', `driver=qcow2,file.driver=file,file.filename=${disk},node-name=disk0`,
    '-device', 'virtio-blk-pci,drive=disk0',
  ]);
  try {
    await vm.waitFor(/^diskcheck: start dev=\/dev\/vda size_mb=64 /m, 60_000);
    await vm.waitFor(/^diskcheck: records=(?:[2-9]\d|\d{3,}) run=[0-9a-f]+ checked=\d+ violations=0/m, 60_000);
    assert.doesNotMatch(await vm.read(), /DISKCHECK (VIOLATION|ERROR)/);
  } finally {
    await vm.stop();
    await fs.rm(dir, { recursive: true, force: true });
  }
});
