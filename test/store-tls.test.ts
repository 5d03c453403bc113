/**
 * A real VM protected and restored through a TLS-only store, configured as a
 * user would: `hydravm store --tls-cert/--tls-key`, `hydravm --store-tls-ca`
 * on protect and restore (the detached checkpointer inherits it).
 */
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { makeLab, readJson, until, pidAlive } from './support/lab.js';
import { spawnStore, type StoreProcess } from '../src/store/spawn.js';
import { makeTlsFiles } from '../src/util/openssl-certs.js';
import { countViolations, readSerial, waitForMemcheckStep } from '../src/vm/serial.js';

const lab = makeLab('tls');
const storeDir = path.join(lab.home, 'store');
const certs = makeTlsFiles(path.join(lab.home, 'tls'));
const other = makeTlsFiles(path.join(lab.home, 'tls'), 'other');
let store: StoreProcess;

before(async () => {
  store = await spawnStore({ dir: storeDir, env: lab.env, extraArgs: ['--tls-cert', certs.cert, '--tls-key', certs.key], logFile: path.join(lab.home, 'store.log') });
});
after(async () => {
  lab.cli(['vm', 'stop', 'tls1']);
  await store?.stop();
  lab.cleanup();
});

const protection = (vm: string) => readJson<{ committedEpoch: number; pid: number }>(path.join(lab.home, 'vms', vm, 'protection.json'));
const vmState = (vm: string) => readJson<{ qemuPid: number; lifecycle: string }>(path.join(lab.home, 'vms', vm, 'state.json'))!;
const serialOf = (vm: string) => path.join(lab.home, 'vms', vm, 'serial.log');

test('protect and network-mode restore through a TLS store; a wrong CA and a missing CA are refused clearly', async () => {
  const vm = 'tls1';
  const spec = lab.writeSpec(vm, { cmdline: 'console=ttyS0 quiet hydra.run=memcheck memcheck.mb=32 memcheck.rate=8' });
  assert.equal(lab.cli(['vm', 'start', spec]).code, 0);
  await waitForMemcheckStep(serialOf(vm), 1, 60_000); // boot under TCG on a loaded machine

  const plain = await lab.cliAsync(['protect', vm, '--store', store.address, '--interval', '1s']);
  assert.notEqual(plain.code, 0, 'protect without the CA fails');
  assert.match(plain.stderr, /--store-tls-ca/);
  const wrong = await lab.cliAsync(['--store-tls-ca', other.ca, 'protect', vm, '--store', store.address, '--interval', '1s']);
  assert.notEqual(wrong.code, 0);
  assert.match(wrong.stderr, /not signed by the CA/);

  const p = await lab.cliAsync(['--store-tls-ca', certs.ca, 'protect', vm, '--store', store.address, '--interval', '1s']);
  assert.equal(p.code, 0, p.stderr);
  // Incrementals come from the detached checkpointer: it got the CA through the environment.
  await until('epoch 3 over TLS', () => (protection(vm)?.committedEpoch ?? 0) >= 3, 60_000);

  const killedAt = fs.statSync(serialOf(vm)).size;
  process.kill(vmState(vm).qemuPid, 'SIGKILL');
  await until('crash recorded', () => vmState(vm).lifecycle === 'crashed', 10_000);
  await until('checkpointer exits', () => !pidAlive(protection(vm)!.pid), 10_000);

  const bad = await lab.cliAsync(['restore', vm, '--store', store.address, '--mode', 'network', '--store-tls-ca', other.ca]);
  assert.notEqual(bad.code, 0);
  assert.match(bad.stderr, /not signed by the CA/);
  const r = await lab.cliAsync(['restore', vm, '--store', store.address, '--mode', 'network', '--store-tls-ca', certs.ca]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /memory complete after/);
  const resumed = await waitForMemcheckStep(serialOf(vm), 1, 60_000, killedAt);
  await waitForMemcheckStep(serialOf(vm), resumed.step + 5, 60_000, killedAt);
  assert.equal(countViolations(serialOf(vm)), 0, readSerial(serialOf(vm)).split('\n').filter((l) => /VIOLATION/.test(l)).slice(0, 5).join('\n'));
  assert.equal(lab.cli(['vm', 'stop', vm]).code, 0);
});
