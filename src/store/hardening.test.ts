/**
 * The store process (`hydravm store`, as a user runs it) under hostile and
 * broken peers: a pre-authentication flood, half-open and silent
 * checkpointers, and the TLS transport.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { FrameType, StoreClient, encodeFrame } from '../protocol/index.js';
import { spawnStore, type StoreProcess } from './spawn.js';
import { PAGE, SECRET, commitFullCheckpoint, prng, tmpDir } from '../../test/support/store-data.js';
import { hostPort, makeTlsFiles, rawHandshake, rssBytes } from '../../test/support/protocol-peers.js';

const code = (c: string) => (e: unknown) => {
  assert.equal((e as { code?: string }).code, c, (e as Error).message);
  return true;
};
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const stores: StoreProcess[] = [];
after(async () => {
  for (const s of stores) await s.stop();
});

async function storeProcess(extraArgs: string[] = []): Promise<StoreProcess & { dir: string; log: string }> {
  const home = tmpDir('hydra-hard-');
  const dir = path.join(home, 'store');
  const log = path.join(home, 'store.log');
  const s = await spawnStore({ dir, extraArgs, logFile: log, env: { ...process.env, HYDRAVM_SECRET: SECRET, HYDRAVM_HOME: home, HYDRAVM_LOG_LEVEL: 'warn' } });
  stores.push(s);
  return { ...s, dir, log };
}

function connect(address: string, vm: string, generation: number, extra: Partial<Parameters<typeof StoreClient.connect>[0]> = {}) {
  return StoreClient.connect({ address, secret: SECRET, vm, generation, role: 'checkpointer', timeoutMs: 10_000, tls: null, ...extra });
}


test('pre-authentication flood: the store stays small and a real checkpointer keeps working', async () => {
  const s = await storeProcess();
  const pid = s.proc.pid!;
  const RAM = 8 * 1024 * 1024;
  // Warm the legitimate path first, so its buffers are part of the baseline.
  const warm = await connect(s.address, 'flood', 1);
  await commitFullCheckpoint(warm, 1, RAM, 1);
  await warm.close();
  await sleep(500);
  const base = rssBytes(pid);

  let stop = false;
  let floodBytes = 0;
  let floodConns = 0;
  const held: net.Socket[] = [];
  const { host, port } = hostPort(s.address);
  const chunk = Buffer.alloc(1024 * 1024, 0x41);
  // A HELLO header claiming 16 MiB, then data as fast as the socket takes it.
  const bigHeader = encodeFrame(FrameType.HELLO, Buffer.alloc(0));
  bigHeader.writeUInt32BE(16 * 1024 * 1024, 12);
  // Maximal pre-auth frames, pipelined without waiting for any answer.
  const maxFrame = encodeFrame(FrameType.HELLO, Buffer.alloc(4096, 0x7b));
  const worker = async (kind: 'big' | 'pipeline') => {
    while (!stop) {
      await new Promise<void>((resolve) => {
        const sock = net.connect({ host, port });
        floodConns++;
        sock.on('error', () => undefined); // the store hanging up on the flood is the point
        sock.on('close', () => resolve());
        sock.on('connect', () => {
          const pump = () => {
            while (!stop && !sock.destroyed) {
              const b = kind === 'big' ? chunk : maxFrame;
              floodBytes += b.length;
              if (!sock.write(b)) return sock.once('drain', pump);
            }
            sock.destroy();
          };
          if (kind === 'big') sock.write(bigHeader);
          pump();
        });
      });
      await sleep(5);
    }
  };
  // Stalled handshakes: half a HELLO header, then nothing, far more of them than the pending cap.
  let stallersDropped = 0;
  for (let i = 0; i < 300; i++) {
    const sock = net.connect({ host, port }, () => sock.write(bigHeader.subarray(0, 10)));
    sock.on('error', () => undefined); // evicted by the store: expected
    sock.on('close', () => stop || stallersDropped++);
    held.push(sock);
  }
  const workers = [...Array.from({ length: 20 }, () => worker('big')), ...Array.from({ length: 20 }, () => worker('pipeline'))];
  let peak = base;
  const sampler = setInterval(() => (peak = Math.max(peak, rssBytes(pid))), 50);
  const legit: number[] = [];
  try {
    const t0 = Date.now();
    for (let epoch = 2; epoch <= 4; epoch++) {
      // A real checkpointer reconnects when its handshake is cut short, as the protect loop does.
      let c: StoreClient | null = null;
      for (let attempt = 0; !c; attempt++) {
        try {
          c = await connect(s.address, 'flood', 1);
        } catch (err) {
          if (attempt > 50) throw err;
          await sleep(100);
        }
      }
      const img = await commitFullCheckpoint(c, epoch, RAM, epoch * 10);
      const reader = await connect(s.address, 'flood', 1, { role: 'reader' });
      assert.ok((await reader.readPages([{ offset: 0, length: RAM }])).equals(img), `epoch ${epoch} reads back intact during the flood`);
      await reader.close();
      await c.close();
      legit.push(Date.now() - t0);
    }
    while (Date.now() - t0 < 6000) await sleep(200);
  } finally {
    stop = true;
    clearInterval(sampler);
    for (const h of held) h.destroy();
    await Promise.all(workers);
  }
  const grown = peak - base;
  console.log(`# flood: ${stallersDropped} of 300 stalled handshakes evicted, ${floodConns} connections, ${(floodBytes / 2 ** 20).toFixed(0)} MiB offered; store RSS ${(base / 2 ** 20).toFixed(0)} MiB -> peak ${(peak / 2 ** 20).toFixed(0)} MiB; legit checkpoints done at ${legit.join(', ')} ms`);
  assert.equal(legit.length, 3);
  // The store keeps at most 64 handshakes: newer connections pushed the stalled ones out.
  assert.ok(stallersDropped >= 300 - 64, `only ${stallersDropped} of 300 stalled handshakes were dropped by the store`);
  assert.ok(floodBytes > 128 * 2 ** 20, `the flood offered ${floodBytes} bytes: too little to mean anything`);
  assert.ok(grown < 96 * 2 ** 20, `store RSS grew by ${(grown / 2 ** 20).toFixed(0)} MiB under the pre-auth flood`);
  // Still serving afterwards.
  const after = await connect(s.address, 'flood', 1);
  assert.equal(after.committedEpoch, 4);
  await after.close();
});

const protocolModule = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../protocol/index.js');

test('a stopped (SIGSTOP) checkpointer is replaced by a new one of the same generation', async () => {
  const s = await storeProcess();
  const RAM = 2 * 1024 * 1024;
  const first = await connect(s.address, 'half', 1);
  await commitFullCheckpoint(first, 1, RAM, 3);
  await first.close();
  // A checkpointer process in the middle of epoch 2, then frozen: its socket stays open, silent.
  const script = `
    const { StoreClient } = await import(${JSON.stringify(protocolModule)});
    const c = await StoreClient.connect({ address: ${JSON.stringify(s.address)}, secret: ${JSON.stringify(SECRET)}, vm: 'half', generation: 1, role: 'checkpointer', tls: null });
    await c.begin(2, 'incremental', { ramSize: ${RAM} });
    await c.sendPages([{ offset: 0, length: ${PAGE} }], Buffer.alloc(${PAGE}, 0xee));
    process.stdout.write('READY\\n');
    setInterval(() => undefined, 1000);
  `;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  try {
    await new Promise<void>((resolve, reject) => {
      child.stdout.on('data', (d: Buffer) => d.toString().includes('READY') && resolve());
      child.once('exit', (c) => reject(new Error(`checkpointer child exited ${c}`)));
    });
    child.kill('SIGSTOP');
    // The replacement is let in at once (no CHECKPOINTER_BUSY), and the half-sent epoch 2 is gone.
    const next = await connect(s.address, 'half', 1);
    assert.equal(next.committedEpoch, 1);
    const img = prng(3, RAM);
    img.fill(0x55, 0, PAGE);
    await next.begin(2, 'incremental', { ramSize: RAM });
    await next.sendPages([{ offset: 0, length: PAGE }], Buffer.alloc(PAGE, 0x55));
    await next.sendDeviceState(Buffer.from('ds'));
    assert.equal((await next.commit()).epoch, 2);
    const r = await connect(s.address, 'half', 1, { role: 'reader' });
    assert.ok((await r.readPages([{ offset: 0, length: RAM }])).equals(img), 'the frozen checkpointer\'s page never landed');
    await r.close();
    await next.close();
  } finally {
    child.kill('SIGKILL');
  }
});

test('idle timeout: a silent authenticated socket is dropped, a quiet client stays connected through PING', async () => {
  const s = await storeProcess(['--idle-timeout', '1500ms']);
  const { peer, welcome } = await rawHandshake(s.address, { secret: SECRET, vm: 'idle', generation: 1 });
  assert.ok(welcome, 'hand-made checkpointer authenticated');
  // From here the raw peer neither reads nor writes.
  peer.sock.pause();
  const t0 = Date.now();
  await new Promise<void>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error('the store kept a silent connection open for 30 s (idle timeout 1.5 s)')), 30_000);
    if (peer.sock.destroyed) resolve();
    else peer.sock.once('close', () => { clearTimeout(t); resolve(); });
  });
  const droppedAfter = Date.now() - t0;
  assert.ok(droppedAfter >= 1000, `dropped after ${droppedAfter} ms, before the idle timeout`);
  // The slot it held is free again, and a client that stays quiet for 3 idle timeouts is kept (PING).
  const c = await connect(s.address, 'idle', 1);
  await sleep(4500);
  await commitFullCheckpoint(c, 1, 64 * PAGE, 9);
  await c.close();
  assert.match(fs.readFileSync(s.log, 'utf8'), /silent beyond the idle timeout/);
});

test('TLS: checkpoint and page read work, a wrong CA, a wrong name and a plain client are refused clearly', async () => {
  const certs = makeTlsFiles(tmpDir('hydra-tls-'));
  const other = makeTlsFiles(tmpDir('hydra-tls-'), 'other');
  const s = await storeProcess(['--tls-cert', certs.cert, '--tls-key', certs.key]);
  const RAM = 4 * 1024 * 1024;
  const c = await connect(s.address, 'tls', 1, { tls: { ca: certs.ca } });
  const img = await commitFullCheckpoint(c, 1, RAM, 21);
  await c.close();
  // The CA from the environment (a directory of PEM files), as child processes get it.
  const caDir = tmpDir('hydra-ca-');
  fs.copyFileSync(certs.ca, path.join(caDir, 'store-ca.pem'));
  process.env.HYDRAVM_STORE_TLS_CA = caDir;
  try {
    const r = await StoreClient.connect({ address: s.address, secret: SECRET, vm: 'tls', generation: 0, role: 'reader' });
    assert.ok((await r.readPages([{ offset: 0, length: RAM }])).equals(img));
    assert.equal((await r.getMeta())?.committedEpoch, 1);
    await r.close();
  } finally {
    delete process.env.HYDRAVM_STORE_TLS_CA;
  }
  await assert.rejects(connect(s.address, 'tls', 1, { tls: { ca: other.ca } }), (e: unknown) => code('HYDRA_STORE_TLS_FAILED')(e) && /not signed by the CA/.test((e as Error).message) && (e as Error).message.includes(other.ca));
  await assert.rejects(connect(s.address, 'tls', 1, { tls: { ca: certs.ca, servername: 'store.example' } }), (e: unknown) => code('HYDRA_STORE_TLS_FAILED')(e) && /does not name/.test((e as Error).message));
  await assert.rejects(connect(s.address, 'tls', 1, { tls: null }), (e: unknown) => code('HYDRA_STORE_CONNECTION_LOST')(e) && /--store-tls-ca/.test((e as Error).message));
  await assert.rejects(connect(s.address, 'tls', 1, { tls: { ca: path.join(caDir, 'missing.pem') } }), code('HYDRA_STORE_TLS_CONFIG'));
  // A TLS client at a plain store.
  const plain = await storeProcess();
  await assert.rejects(connect(plain.address, 'tls', 1, { tls: { ca: certs.ca } }), (e: unknown) => code('HYDRA_STORE_TLS_FAILED')(e) && /does not speak TLS/.test((e as Error).message));
  // Wire check: the guest RAM does not cross in clear text (look for the page bytes on a recording relay).
  const relay = await frameRelayRaw(s.address);
  const marker = Buffer.alloc(PAGE, 0).fill('hydravm-secret-page-', 0);
  const c2 = await connect(relay.address, 'tls', 1, { tls: { ca: certs.ca, servername: 'localhost' } });
  await c2.begin(2, 'incremental', { ramSize: RAM });
  await c2.sendPages([{ offset: 0, length: PAGE }], marker);
  await c2.sendDeviceState(Buffer.from('ds'));
  await c2.commit();
  await c2.close();
  assert.ok(relay.bytes() > PAGE, 'the page crossed the relay');
  assert.ok(!relay.data().includes(Buffer.from('hydravm-secret-page-')), 'page data is encrypted on the wire');
  await relay.close();
});

/** A byte-level relay recording everything the client sends (TLS records are not frames). */
async function frameRelayRaw(target: string): Promise<{ address: string; bytes(): number; data(): Buffer; close(): Promise<void> }> {
  const seen: Buffer[] = [];
  const socks = new Set<net.Socket>();
  const server = net.createServer((c) => {
    const s = net.connect(hostPort(target));
    socks.add(c);
    socks.add(s);
    c.on('data', (b: Buffer) => {
      seen.push(b);
      s.write(b);
    });
    s.pipe(c);
    for (const x of [c, s]) {
      x.on('error', () => undefined); // either end closing first is normal for a relay
      x.on('close', () => { c.destroy(); s.destroy(); });
    }
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    address: `127.0.0.1:${(server.address() as net.AddressInfo).port}`,
    bytes: () => seen.reduce((n, b) => n + b.length, 0),
    data: () => Buffer.concat(seen),
    close: () => new Promise<void>((r) => {
      for (const x of socks) x.destroy();
      server.close(() => r());
    }),
  };
}
