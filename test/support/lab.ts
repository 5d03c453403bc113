// A lab for tests that drive HydraVM through its CLI: an own HYDRAVM_HOME, the CLI, a store.
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync, spawn } from 'node:child_process';
import { cliEntry } from '../../src/config/paths.js';
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { spawnStore, type StoreProcess } from '../../src/store/index.js';
import { countViolations, readSerial, requestFullVerify, waitForMemcheckStep, type FullVerify } from '../../src/vm/index.js';

/**
 * Each test file gets its own HYDRAVM_HOME so runs never see
 * each other's VMs, and drives HydraVM through its real CLI as a user would.
 */
export interface Lab {
  home: string;
  env: NodeJS.ProcessEnv;
  cli(args: string[], opts?: { env?: NodeJS.ProcessEnv; timeoutMs?: number }): { code: number; stdout: string; stderr: string };
  cliAsync(args: string[], opts?: { env?: NodeJS.ProcessEnv; timeoutMs?: number }): Promise<{ code: number; stdout: string; stderr: string }>;
  writeSpec(name: string, fields: Record<string, unknown>): string;
  cleanup(): void;
}

/** `opts.env`: extra environment for every command the lab runs (and the VMs' supervisors they start). */
export function makeLab(prefix: string, opts: { env?: NodeJS.ProcessEnv } = {}): Lab {
  // Short path: unix socket paths are limited to 108 bytes.
  const home = fs.mkdtempSync(path.join('/tmp', `hv-${prefix}-`));
  const env = { ...process.env, ...opts.env, HYDRAVM_HOME: home, HYDRAVM_SECRET: 'test-secret-0123456789abcdef' };
  // Library calls made by the test itself see the same home (each test file is its own process).
  process.env.HYDRAVM_HOME = home;
  process.env.HYDRAVM_SECRET = env.HYDRAVM_SECRET;
  const lab: Lab = {
    home,
    env,
    cli(args, opts = {}) {
      const r = spawnSync(process.execPath, [cliEntry, ...args], { env: { ...env, ...opts.env }, encoding: 'utf8', timeout: opts.timeoutMs ?? 120_000 });
      return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
    },
    cliAsync(args, opts = {}) {
      return new Promise((resolve) => {
        const child = spawn(process.execPath, [cliEntry, ...args], { env: { ...env, ...opts.env } });
        let stdout = '';
        let stderr = '';
        child.stdout.on('data', (d) => (stdout += d));
        child.stderr.on('data', (d) => (stderr += d));
        const t = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 300_000);
        child.on('close', (code) => { clearTimeout(t); resolve({ code: code ?? -1, stdout, stderr }); });
      });
    },
    writeSpec(name, fields) {
      const file = path.join(home, `${name}.json`);
      fs.writeFileSync(file, JSON.stringify({
        name,
        memory: '256M',
        vcpus: 1,
        accel: 'auto',
        kernel: 'guest:vmlinux',
        initrd: 'guest:initrd.img',
        cmdline: 'console=ttyS0 quiet hydra.run=memcheck memcheck.mb=32 memcheck.rate=8',
        ...fields,
      }, null, 2));
      return file;
    },
    cleanup() {
      // Stop whatever a failed test left running, then remove the lab: the lab's own VMs and
      // those of every host of an embedded cluster inside it (DIR/hosts/HOST/vms).
      const vmDirs = [path.join(home, 'vms')];
      for (const c of fs.existsSync(home) ? fs.readdirSync(home) : []) {
        const hosts = path.join(home, c, 'hosts');
        if (fs.existsSync(hosts)) for (const h of fs.readdirSync(hosts)) vmDirs.push(path.join(hosts, h, 'vms'));
      }
      for (const vms of vmDirs) for (const name of fs.existsSync(vms) ? fs.readdirSync(vms) : []) {
        try {
          const st = JSON.parse(fs.readFileSync(path.join(vms, name, 'state.json'), 'utf8'));
          for (const pid of [st.supervisorPid, st.qemuPid]) if (pid) try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
        } catch { /* no state */ }
        try {
          const pr = JSON.parse(fs.readFileSync(path.join(vms, name, 'protection.json'), 'utf8'));
          if (pr.pid) try { process.kill(pr.pid, 'SIGKILL'); } catch { /* gone */ }
        } catch { /* not protected */ }
      }
      // HYDRAVM_TEST_KEEP=1 keeps the lab (serial logs, layers, store) for a post-mortem.
      if (process.env.HYDRAVM_TEST_KEEP === '1') console.error(`# lab kept: ${home}`);
      else fs.rmSync(home, { recursive: true, force: true });
    },
  };
  return lab;
}

export { pidAlive } from '../../src/util/pid.js';
export { sleep } from '../../src/util/sleep.js';
export { tmpDir } from './tmp.js';
export { until } from './until.js';

/** A checkpoint store started through the CLI, as a user would. */
export function startStore(lab: Lab, dir: string, port = 0): Promise<StoreProcess> {
  return spawnStore({ dir, listen: `127.0.0.1:${port}`, env: lab.env });
}

/**
 * The usual set-up of a test file: one lab and one store, started before the
 * file's tests and stopped (and the lab removed) after them. `store.address`
 * is valid inside the tests. `beforeStop` runs first in the teardown.
 */
export function labWithStore(prefix: string, opts: { env?: NodeJS.ProcessEnv; beforeStop?: () => Promise<void> } = {}): { lab: Lab; storeDir: string; store: { readonly address: string } } {
  const lab = makeLab(prefix, opts);
  const storeDir = path.join(lab.home, 'store');
  let proc: StoreProcess | undefined;
  before(async () => {
    proc = await startStore(lab, storeDir);
  });
  after(async () => {
    await opts.beforeStop?.();
    await proc?.stop();
    lab.cleanup();
  });
  const store = {
    get address(): string {
      if (!proc) throw new Error(`the store of lab ${prefix} is not running (used outside a test?)`);
      return proc.address;
    },
  };
  return { lab, storeDir, store };
}

export function readJson<T>(file: string): T | undefined {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8')) as T;
  } catch {
    return undefined;
  }
}

/**
 * Prove the whole guest, not a sample: ask memcheck for a full verification
 * of every page (through the serial console) and require 0 violations over
 * all of its working set, and no violation line since `fromOffset`.
 */
export async function assertFullVerify(serialLog: string, fromOffset = 0): Promise<FullVerify> {
  const full = await requestFullVerify(serialLog, undefined, 180_000);
  assert.equal(full.violations, 0, `memcheck full verification of ${serialLog}: ${full.violations} violations`);
  // The working set as memcheck reports it in every progress line (a restored log has no start line).
  const pages = Number(/memcheck: step=\d+ pages=(\d+)/.exec(readSerial(serialLog))?.[1] ?? 0);
  assert.ok(pages > 0 && full.pages === pages, `every page verified (${full.pages} of ${pages})`);
  assert.equal(countViolations(serialLog, fromOffset), 0, readSerial(serialLog).slice(fromOffset).split('\n').filter((l) => /VIOLATION/.test(l)).slice(0, 5).join('\n'));
  return full;
}

/**
 * After a restore: the guest's memcheck runs on from where it was (written
 * after `killedAt` in its serial log, without rebooting) and a full
 * verification of every page finds no violation.
 */
export async function assertGuestContinues(serialLog: string, killedAt: number): Promise<void> {
  const resumed = await waitForMemcheckStep(serialLog, 1, 30_000, killedAt);
  await waitForMemcheckStep(serialLog, resumed.step + 3, 60_000, killedAt);
  await assertFullVerify(serialLog, killedAt);
  assert.doesNotMatch(readSerial(serialLog).slice(killedAt), /memcheck: start/, 'the guest did not reboot');
}
