import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { makeLab, startStore, readJson, until, sleep, pidAlive } from '../support/lab.js';
import { makeTestNet, tapMaster, SUBNET, NET_PREFIX, type TestNet } from '../support/net.js';
import { cliEntry, imagesDir } from '../../src/config/paths.js';
import { readWatchLog, summarizeWatch, lossReport, lastAcked, type WatchRecord } from '../../src/bench/redis-watcher.js';
import { readCheckpointHistory } from '../../src/checkpoint/protection.js';
import { QmpClient } from '../../src/qmp/index.js';
import { localShellConfig, startShell, stopAllShells } from '../../src/vm/index.js';

/**
 * A real Debian VM (systemd, redis-server from Debian) on a qcow2 root disk
 * backed by the shared built image, serving redis over a virtio-net NIC on a
 * tap on a bridge, watched by a client in another network namespace; killed
 * and restored in both memory modes; its root file system checked at the end.
 * The image is built once (cached in HYDRAVM_CACHE) and shared by every run.
 */
const lab = makeLab('deb');
const storeDir = path.join(lab.home, 'store');
const VM = 'deb1';
const MAC = '52:54:00:9a:00:10';
const VM_ADDR = `${SUBNET}.10`;
const TAP = `${NET_PREFIX}dt0`;
const rootDisk = path.join(lab.home, 'deb1-root.qcow2');
const watchLog = path.join(lab.home, 'watch.jsonl');
let net: TestNet;
let store: Awaited<ReturnType<typeof startStore>>;
let watcher: ChildProcess | undefined;

const vmFile = (f: string) => path.join(lab.home, 'vms', VM, f);
const vmState = () => readJson<{ qemuPid: number; lifecycle: string }>(vmFile('state.json'))!;
const protection = () => readJson<{ committedEpoch: number; generation: number; pid: number; state: string }>(vmFile('protection.json'));
const records = (): WatchRecord[] => (fs.existsSync(watchLog) ? readWatchLog(watchLog) : []);
const note = (msg: string) => process.stdout.write(`${msg}\n`);

before(async () => {
  const t = performance.now();
  const img = await lab.cliAsync(['image', 'build', 'debian', '--json'], { timeoutMs: 40 * 60_000 });
  assert.equal(img.code, 0, img.stderr);
  const built = JSON.parse(img.stdout) as { built: boolean; info: { buildSeconds: number } };
  note(`image: ${built.built ? `built in ${built.info.buildSeconds} s` : 'cached'} (${((performance.now() - t) / 1000).toFixed(1)} s here)`);
  net = makeTestNet('d', { clientHost: 2 });
  store = await startStore(lab, storeDir);
});

after(async () => {
  if (watcher && watcher.exitCode === null) watcher.kill('SIGKILL');
  await stopAllShells();
  await store?.stop();
  lab.cleanup();
  // A persistent tap outlives a QEMU killed by the cleanup: remove it with the bridge.
  if (fs.existsSync(`/sys/class/net/${TAP}`)) execFileSync('ip', ['link', 'del', TAP]);
  net?.remove();
});

async function waitReplyAfter(t: number, timeoutMs: number, what: string): Promise<WatchRecord> {
  return until(what, () => records().find((r) => r.ok && r.op === 'incr' && r.t > t), timeoutMs);
}

test('the Debian VM boots from its qcow2 root on the shared base and serves redis over its NIC to another namespace', async () => {
  const kernel = fs.existsSync(path.join(imagesDir(), 'debian', 'vmlinux')) ? 'image:debian/vmlinux' : 'image:debian/vmlinuz';
  const spec = lab.writeSpec(VM, {
    memory: '512M',
    kernel,
    initrd: 'image:debian/initrd.img',
    cmdline: `console=ttyS0 root=/dev/vda rw net.ifnames=0 ip=${VM_ADDR}::${SUBNET}.1:255.255.255.0::eth0:off`,
    root: { path: rootDisk, base: 'image:debian/root.qcow2' },
    nics: [{ mac: MAC, bridge: net.bridge, tap: TAP }],
  });
  const t0 = Date.now();
  const r = lab.cli(['vm', 'start', spec]);
  assert.equal(r.code, 0, r.stderr);
  const info = JSON.parse(execFileSync('qemu-img', ['info', '-U', '--output=json', rootDisk]).toString()) as { 'backing-filename'?: string };
  assert.equal(info['backing-filename'], fs.realpathSync(path.join(imagesDir(), 'debian', 'root.qcow2')), 'root disk is an overlay on the built image');
  assert.equal(tapMaster(TAP), net.bridge);

  const argv = net.inNs([process.execPath, cliEntry, 'bench', 'redis-watch', '--host', VM_ADDR, '--out', watchLog]);
  watcher = spawn(argv[0]!, argv.slice(1), { env: lab.env, stdio: ['ignore', 'pipe', 'pipe'] });
  const first = await waitReplyAfter(0, 10 * 60_000, 'redis answering the client in the other namespace');
  note(`boot: vm start to the first redis reply over the NIC: ${((first.t - t0) / 1000).toFixed(1)} s`);
  // The console lags behind the service under load, and systemd shortens unit names to fit it ("redis-server.serv…").
  await until('systemd reporting redis-server started on the console', () => /Started .*redis-server/.test(fs.readFileSync(vmFile('serial.log'), 'utf8')), 120_000);
  assert.match(fs.readFileSync(vmFile('serial.log'), 'utf8'), /Welcome to .*Debian GNU\/Linux/);
});

/** Kill QEMU shortly after a commit, restore (into a restore shell waiting for the VM's configuration, if `warm`), and check what the client sees. */
async function failOver(mode: 'network' | 'file', restoreArgs: string[], warm = false): Promise<void> {
  await until('three committed checkpoints', () => (protection()?.committedEpoch ?? 0) >= 3, 5 * 60_000);
  // The shell's key comes from the running VM's recorded configuration (root disk size, the NIC's model), as an agent's pool does it.
  const shellConfig = warm ? localShellConfig(VM) : undefined;
  if (warm) assert.ok(shellConfig?.nics?.length === 1, 'a shell configuration with the NIC');
  const shell = shellConfig ? await startShell(shellConfig) : undefined;
  const e = protection()!.committedEpoch;
  await until('the next commit', () => protection()!.committedEpoch > e, 60_000);
  await sleep(Math.floor(Math.random() * 800));
  const killAt = Date.now();
  process.kill(vmState().qemuPid, 'SIGKILL');
  await until('crash recorded', () => vmState().lifecycle === 'crashed', 20_000);
  await until('checkpointer gives up on the dead VM', () => !pidAlive(protection()!.pid), 20_000);
  await until('the dead VM\'s tap removed', () => !fs.existsSync(`/sys/class/net/${TAP}`), 20_000);

  const restoreAt = Date.now();
  const r = await lab.cliAsync(['restore', VM, '--store', store.address, '--mode', mode, ...restoreArgs]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, new RegExp(`VM ${VM} restored from generation (\\d+) epoch (\\d+) \\(${mode} mode\\)`));
  if (shell) assert.match(r.stdout, new RegExp(`VM ${VM} restored into restore shell ${shell.id} `), 'the NIC was plugged into the waiting shell');
  else assert.match(r.stdout, new RegExp(`VM ${VM} started cold`));
  assert.match(r.stdout, new RegExp(`VM ${VM} announced itself on its network \\(QMP announce-self\\)`));
  const [, gen, ep] = /generation (\d+) epoch (\d+)/.exec(r.stdout)!;
  // Our announce-self (empty id) is in QEMU's trace; QEMU's own post-load announce uses id "_".
  assert.match(fs.readFileSync(vmFile('qemu.log'), 'utf8'), new RegExp(`qemu_announce_self_iter :vnet0:${MAC}`));
  assert.equal(tapMaster(TAP), net.bridge, 'a fresh tap of the same name on the same bridge');
  assert.match(execFileSync('bridge', ['fdb', 'show', 'br', net.bridge]).toString(), new RegExp(`${MAC} dev ${TAP} `), 'the bridge learned the MAC on the new tap');

  const reply = await waitReplyAfter(killAt, 5 * 60_000, 'the client reconnecting to the same address');
  await sleep(1000);
  const recs = records();
  const s = summarizeWatch(recs.filter((x) => x.t > killAt - 10_000 && x.t < reply.t + 1000), killAt);
  const loss = lossReport(recs, killAt);
  // Everything the client saw acknowledged before the restored checkpoint's pause began is in redis.
  const cp = readCheckpointHistory(VM).find((h) => h.generation === Number(gen) && h.epoch === Number(ep));
  assert.ok(cp, `checkpoint history has generation ${gen} epoch ${ep}`);
  const ackedAtCheckpoint = lastAcked(recs, 'incr', cp.startedAt) ?? 0;
  assert.ok(loss.found !== null, 'the client read the counter after the restore');
  assert.ok(loss.found >= ackedAtCheckpoint, `counter after restore ${loss.found} >= ${ackedAtCheckpoint} acknowledged before the checkpoint of epoch ${ep}`);
  // What the client met between the kill and its first reply (connection refused, unreachable, timeouts).
  const kinds = new Map<string, number>();
  for (const x of recs) {
    if (x.ok || x.t <= killAt || x.t > reply.t) continue;
    const k = `${x.op}: ${(x.error ?? '').replace(/.*(failed|closed|took|got no reply)/, '$1').replace(/[\d.:]+/g, 'N').slice(0, 60)}`;
    kinds.set(k, (kinds.get(k) ?? 0) + 1);
  }
  const firstConnect = recs.find((x) => x.ok && x.op === 'connect' && x.t > killAt);
  note(`${mode} fail-over, client side: ${[...kinds].map(([k, n]) => `${n} x ${k}`).join('; ')}; first connection after the kill at +${firstConnect ? (firstConnect.t - killAt).toFixed(0) : '?'} ms`);
  const running = /running ([\d.]+ m?s) after QEMU was spawned \(([\d.]+ m?s) with/.exec(r.stdout);
  note(`${mode} fail-over: kill to first reply ${s.firstReplyAfterKillMs?.toFixed(0)} ms, longest gap ${s.longestGapMs.toFixed(0)} ms `
    + `(kill to restore command ${restoreAt - killAt} ms, waiting for the crash to be recorded; restore command to first reply ${(reply.t - restoreAt).toFixed(0)} ms; `
    + `QEMU spawn to running ${running?.[1]}, launch to running ${running?.[2]}); `
    + `counter acknowledged before the kill ${loss.ackedBeforeKill}, found ${loss.found}, acknowledged increments lost ${loss.lostAcked}; `
    + `acknowledged at the checkpoint's pause ${ackedAtCheckpoint}`);
}

test('protected, QEMU SIGKILLed, restored in network mode into a restore shell onto a fresh tap: announced, the client reconnects, redis keeps every write of the checkpoint', async () => {
  const p = await lab.cliAsync(['protect', VM, '--store', store.address, '--interval', '1s']);
  assert.equal(p.code, 0, p.stderr);
  await failOver('network', ['--protect', '--interval', '1s'], true);
});

test('killed again, restored in file mode, cold: the same checks', async () => {
  await until('protected again after the network restore', () => protection()?.state === 'protected' && pidAlive(protection()!.pid), 60_000);
  await failOver('file', ['--store-dir', storeDir]);
});

test('after a clean shutdown the root disk chain passes qemu-img check and fsck -n', async () => {
  watcher!.kill('SIGTERM');
  const summary = await new Promise<string>((resolve) => { let out = ''; watcher!.stdout!.on('data', (d) => (out += d)); watcher!.once('exit', () => resolve(out)); });
  note(`client summary: ${summary.trim()}`);
  if ((protection()?.state ?? 'stopped') !== 'stopped' && pidAlive(protection()?.pid)) assert.equal(lab.cli(['unprotect', VM], { timeoutMs: 180_000 }).code, 0);
  // A clean guest shutdown (ACPI power button -> systemd poweroff), so the file system is unmounted.
  const qmp = await QmpClient.connect(vmFile('qmp.sock'));
  await qmp.execute('system_powerdown');
  qmp.close();
  await until('the guest powering off', () => !pidAlive(vmState().qemuPid), 5 * 60_000);
  assert.equal(lab.cli(['vm', 'stop', VM]).code, 0);
  assert.ok(!fs.existsSync(`/sys/class/net/${TAP}`), 'tap removed');

  // A restored VM runs on an overlay over the checkpoint's frozen layers, over its root disk: check the whole chain from its top.
  const top = readJson<{ launch: { diskFiles?: string[] } }>(vmFile('spec.json'))!.launch.diskFiles?.[0] ?? rootDisk;
  const chain = JSON.parse(execFileSync('qemu-img', ['info', '--backing-chain', '--output=json', top]).toString()) as { filename: string }[];
  note(`root chain: ${chain.map((i) => i.filename).join(' -> ')}`);
  assert.ok(chain.some((i) => i.filename === rootDisk), 'the root disk is in the chain');
  for (const layer of chain.slice(0, -1)) execFileSync('qemu-img', ['check', layer.filename]);
  const raw = path.join(lab.home, 'root-export.raw');
  execFileSync('qemu-img', ['convert', '-O', 'raw', top, raw]);
  try {
    const out = execFileSync('fsck.ext4', ['-n', '-f', raw], { stdio: ['ignore', 'pipe', 'pipe'] }).toString();
    note(`fsck: ${out.trim().split('\n').at(-1)}`);
  } finally {
    fs.rmSync(raw, { force: true });
  }
});
