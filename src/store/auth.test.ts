/**
 * Protocol security over real sockets: every mix of genuine and fake peers
 * with and without the secret, replayed and relayed handshakes, and tampered
 * frames after the handshake in both directions.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { crc32 } from 'node:zlib';
import {
  FRAME_HEADER_SIZE, FrameType, StoreClient, decodeJson, encodeJson, errorSchema,
} from '../protocol/index.js';
import { startStoreServer, openVmImage, type StoreServer } from './index.js';
import { PAGE, SECRET, commitFullCheckpoint, prng, tmpDir } from '../../test/support/store-data.js';
import { RawPeer, fakeStore, flipPayloadBit, frameRelay, rawHandshake, type RelayedFrame } from '../../test/support/protocol-peers.js';

const code = (c: string) => (e: unknown) => {
  assert.equal((e as { code?: string }).code, c, (e as Error).message);
  return true;
};

const cleanup: (() => Promise<void>)[] = [];
after(async () => {
  for (const f of cleanup.reverse()) await f();
});

async function start(): Promise<StoreServer> {
  const s = await startStoreServer({ dir: tmpDir(), listen: '127.0.0.1:0', secret: SECRET });
  cleanup.push(() => s.close());
  return s;
}

function client(address: string, vm: string, generation: number, opts: { secret?: string; role?: 'checkpointer' | 'reader' } = {}) {
  return StoreClient.connect({ address, secret: opts.secret ?? SECRET, vm, generation, role: opts.role ?? 'checkpointer', timeoutMs: 5000, tls: null });
}


test('handshake mixes: genuine and fake clients and stores, with and without the secret', async () => {
  const s = await start();
  // Genuine client, genuine store, same secret: the only mix that works.
  const ok = await client(s.address, 'mix', 1);
  assert.equal(ok.welcome.vm, 'mix');
  await ok.close();
  // Genuine client with the wrong secret.
  await assert.rejects(client(s.address, 'mix', 1, { secret: 'not-the-cluster-secret' }), code('HYDRA_STORE_AUTH_FAILED'));
  // Fake client without the secret: a random proof is refused and nothing is registered.
  const noSecret = await rawHandshake(s.address, { secret: null, vm: 'mix', generation: 7 });
  assert.equal(noSecret.welcome, null);
  assert.equal(await noSecret.peer.closedWith(), 'HYDRA_STORE_AUTH_FAILED');
  assert.equal(await s.store.highestGeneration('mix'), 1, 'an unauthenticated HELLO registers nothing');
  // Fake client with the secret (hand-made handshake) is accepted: the raw peer is a faithful client.
  const withSecret = await rawHandshake(s.address, { secret: SECRET, vm: 'mix', generation: 1 });
  assert.ok(withSecret.welcome?.authenticated, 'the store tags WELCOME');
  // ...but an untagged frame after the handshake ends the connection.
  withSecret.peer.sendMac = null;
  withSecret.peer.send(FrameType.GET_META, encodeJson({}));
  assert.equal(await withSecret.peer.closedWith(), 'HYDRA_PROTOCOL_UNAUTHENTICATED');
  // A client that skips AUTH and sends a request right after CHALLENGE.
  const skip = await RawPeer.connect(s.address);
  skip.send(FrameType.HELLO, encodeJson({ minVersion: 2, maxVersion: 2, vm: 'mix', generation: 9, role: 'checkpointer', nonce: 'ab'.repeat(32) }));
  assert.equal((await skip.next())?.type, FrameType.CHALLENGE);
  skip.send(FrameType.BEGIN, encodeJson({ epoch: 1, kind: 'full', ramSize: PAGE }));
  assert.equal(await skip.closedWith(), 'HYDRA_PROTOCOL_UNEXPECTED');
  // A version-1 client (no nonce, one-way HMAC) is refused, not downgraded to.
  const v1 = await RawPeer.connect(s.address);
  v1.send(FrameType.HELLO, encodeJson({ minVersion: 1, maxVersion: 1, vm: 'mix', generation: 1, role: 'checkpointer' }));
  assert.ok(['HYDRA_PROTOCOL_VERSION', 'HYDRA_PROTOCOL_BAD_PAYLOAD'].includes((await v1.closedWith())!));

  // Fake store without the secret, WELCOME untagged: the client refuses before sending anything else.
  const f1 = await fakeStore({ secret: null, tagWelcome: false });
  cleanup.push(f1.close);
  await assert.rejects(client(f1.address, 'mix', 1), (e: unknown) => code('HYDRA_PROTOCOL_UNAUTHENTICATED')(e) && /did not prove/.test((e as Error).message));
  // Fake store without the secret, WELCOME tagged with keys of its own: the tag fails.
  const f2 = await fakeStore({ secret: null, tagWelcome: true });
  cleanup.push(f2.close);
  await assert.rejects(client(f2.address, 'mix', 1), code('HYDRA_PROTOCOL_BAD_MAC'));
  // Fake store with the secret that does not check the client: a client with the wrong secret still refuses it.
  const f3 = await fakeStore({ secret: SECRET, tagWelcome: true, checkClientProof: false });
  cleanup.push(f3.close);
  await assert.rejects(client(f3.address, 'mix', 1, { secret: 'not-the-cluster-secret' }), code('HYDRA_PROTOCOL_BAD_MAC'));
  // Fake store with the secret, behaving: accepted (so the refusals above are the checks, not the fake).
  const f4 = await fakeStore({ secret: SECRET, tagWelcome: true, checkClientProof: true });
  cleanup.push(f4.close);
  const c4 = await client(f4.address, 'mix', 1);
  await c4.close();
  for (const f of [f1, f2, f3]) assert.deepEqual(f.received.filter((t) => t !== FrameType.HELLO && t !== FrameType.AUTH), [], 'nothing sent to a store that did not prove the secret');
});

test('a recorded handshake replayed to the store is refused', async () => {
  const s = await start();
  const relay = await frameRelay(s.address);
  cleanup.push(relay.close);
  const c = await client(relay.address, 'rep', 1);
  await commitFullCheckpoint(c, 1, 64 * PAGE, 5);
  await c.close();
  assert.ok(relay.recorded.c2s.length >= 5);
  // Replay the client's bytes verbatim (HELLO, AUTH, BEGIN, ...) on a new connection, one frame per reply.
  const peer = await RawPeer.connect(s.address);
  peer.sock.write(relay.recorded.c2s[0]!);
  assert.equal((await peer.next())?.type, FrameType.CHALLENGE, 'a replayed HELLO gets a fresh challenge');
  peer.sock.write(relay.recorded.c2s[1]!);
  assert.equal(await peer.closedWith(), 'HYDRA_STORE_AUTH_FAILED', 'the recorded AUTH answered another nonce');
  const meta = (await openVmImage(s.store.dir, 'rep')).meta;
  assert.equal(meta.committedEpoch, 1);
});

test('a relay cannot splice a genuine answer onto its own HELLO', async () => {
  const s = await start();
  // 1. Rewrite the client's HELLO in flight (claim generation 2^31): the genuine AUTH no longer fits.
  const rewrite = await frameRelay(s.address, {
    c2s: (f: RelayedFrame) => {
      if (f.type !== FrameType.HELLO) return f.bytes;
      const hello = JSON.parse(f.bytes.subarray(FRAME_HEADER_SIZE).toString()) as Record<string, unknown>;
      return encodeFrameRaw(FrameType.HELLO, encodeJson({ ...hello, generation: 2 ** 31 }));
    },
  });
  cleanup.push(rewrite.close);
  await assert.rejects(client(rewrite.address, 'spl', 1), code('HYDRA_STORE_AUTH_FAILED'));
  assert.equal((await s.store.highestGeneration('spl')) ?? 0, 0, 'the forged generation was never registered');

  // 2. Two sessions: the attacker opens its own HELLO (generation 2^31) and feeds the store's CHALLENGE
  //    to a genuine client whose HELLO claims generation 1; the client's AUTH goes to the attacker's session.
  const attacker = await RawPeer.connect(s.address);
  attacker.send(FrameType.HELLO, encodeJson({ minVersion: 2, maxVersion: 2, vm: 'spl', generation: 2 ** 31, role: 'checkpointer', nonce: 'cd'.repeat(32) }));
  const realChallenge = await attacker.next();
  assert.equal(realChallenge?.type, FrameType.CHALLENGE);
  let stolenAuth: Buffer | null = null;
  const splice = await frameRelay(s.address, {
    s2c: (f) => (f.type === FrameType.CHALLENGE ? encodeFrameRaw(FrameType.CHALLENGE, realChallenge!.payload) : f.bytes),
    c2s: (f) => {
      if (f.type === FrameType.AUTH) stolenAuth = f.bytes;
      return f.bytes;
    },
  });
  cleanup.push(splice.close);
  await assert.rejects(client(splice.address, 'spl', 1));
  assert.ok(stolenAuth, 'the genuine client answered the spliced challenge');
  attacker.sock.write(stolenAuth!);
  assert.equal(await attacker.closedWith(), 'HYDRA_STORE_AUTH_FAILED');
  assert.equal((await s.store.highestGeneration('spl')) ?? 0, 0);
});

/** A frame without a tag, byte for byte as a peer would send it during the handshake. */
function encodeFrameRaw(type: FrameType, payload: Buffer): Buffer {
  const h = Buffer.alloc(FRAME_HEADER_SIZE);
  h.write('HVMP', 0, 'latin1');
  h.writeUInt16BE(2, 4);
  h.writeUInt16BE(type, 6);
  h.writeUInt32BE(payload.length, 12);
  h.writeUInt32BE(crc32(payload), 16);
  return Buffer.concat([h, payload]);
}

test('tampering after the handshake: flipped page data, replayed, dropped and reordered frames are refused', async () => {
  const RAM = 256 * PAGE;
  const s = await start();
  const base = await client(s.address, 'tam', 1);
  const img = await commitFullCheckpoint(base, 1, RAM, 11);
  await base.close();

  type Case = { name: string; c2s: (f: RelayedFrame, st: { pages: Buffer[] }) => Buffer | Buffer[] | null; expect: string[] };
  const cases: Case[] = [
    // CRC fixed up: only the tag can catch it.
    { name: 'bit flip inside page data, CRC fixed', c2s: (f) => (f.type === FrameType.PAGES ? flipPayloadBit(f.bytes, f.bytes.readUInt32BE(12) - 100, true) : f.bytes), expect: ['HYDRA_PROTOCOL_BAD_MAC'] },
    { name: 'bit flip inside page data', c2s: (f) => (f.type === FrameType.PAGES ? flipPayloadBit(f.bytes, 5000, false) : f.bytes), expect: ['HYDRA_PROTOCOL_BAD_CRC', 'HYDRA_PROTOCOL_BAD_MAC'] },
    { name: 'bit flip in a header (flags)', c2s: (f) => (f.type === FrameType.BEGIN ? Buffer.concat([f.bytes.subarray(0, 11), Buffer.from([f.bytes[11]! ^ 0x01]), f.bytes.subarray(12)]) : f.bytes), expect: ['HYDRA_PROTOCOL_BAD_MAC'] },
    { name: 'bit flip in the tag', c2s: (f) => (f.type === FrameType.COMMIT ? Buffer.concat([f.bytes.subarray(0, -1), Buffer.from([f.bytes[f.bytes.length - 1]! ^ 0x80])]) : f.bytes), expect: ['HYDRA_PROTOCOL_BAD_MAC'] },
    { name: 'replayed PAGES frame', c2s: (f) => (f.type === FrameType.PAGES ? [f.bytes, f.bytes] : f.bytes), expect: ['HYDRA_PROTOCOL_BAD_MAC'] },
    { name: 'dropped PAGES frame', c2s: (f) => (f.type === FrameType.PAGES ? null : f.bytes), expect: ['HYDRA_PROTOCOL_BAD_MAC'] },
    {
      name: 'reordered DEVSTATE before PAGES',
      c2s: (f, st) => {
        if (f.type === FrameType.PAGES) { st.pages.push(f.bytes); return null; }
        if (f.type === FrameType.DEVSTATE) return [f.bytes, ...st.pages.splice(0)];
        return f.bytes;
      },
      expect: ['HYDRA_PROTOCOL_BAD_MAC'],
    },
  ];
  for (const k of cases) {
    const st = { pages: [] as Buffer[] };
    const relay = await frameRelay(s.address, { c2s: (f) => k.c2s(f, st) });
    const c = await client(relay.address, 'tam', 1);
    const closed = new Promise<string | null>((resolve) => {
      // The store's verdict arrives as ERROR before it closes; read it off the relay's record.
      const t = setInterval(() => {
        const err = relay.recorded.s2c.find((b) => b.readUInt16BE(6) === FrameType.ERROR);
        if (err) { clearInterval(t); resolve(decodeJson(FrameType.ERROR, err.subarray(FRAME_HEADER_SIZE, FRAME_HEADER_SIZE + err.readUInt32BE(12)), errorSchema).code); }
      }, 20);
      setTimeout(() => { clearInterval(t); resolve(null); }, 10_000);
    });
    await assert.rejects(commitFullCheckpoint(c, 2, RAM, 100), (e: unknown) => e instanceof Error, k.name);
    const got = await closed;
    assert.ok(got !== null && k.expect.includes(got), `${k.name}: store answered ${got}, expected ${k.expect.join(' or ')}`);
    await c.close().catch(() => undefined);
    await relay.close();
  }
  // None of it reached the image.
  const now = await openVmImage(s.store.dir, 'tam');
  assert.equal(now.meta.committedEpoch, 1);
  assert.ok(fs.readFileSync(now.memoryPath).equals(img));
});

test('tampering from the store side: a flipped bit in read page data is refused by the client', async () => {
  const RAM = 256 * PAGE;
  const s = await start();
  const w = await client(s.address, 'rd', 1);
  await commitFullCheckpoint(w, 1, RAM, 12);
  await w.close();
  for (const fixCrc of [true, false]) {
    const relay = await frameRelay(s.address, { s2c: (f) => (f.type === FrameType.PAGES ? flipPayloadBit(f.bytes, f.bytes.readUInt32BE(12) - 1, fixCrc) : f.bytes) });
    const r = await client(relay.address, 'rd', 1, { role: 'reader' });
    await assert.rejects(r.readPages([{ offset: 0, length: RAM }]), (e: unknown) => ['HYDRA_PROTOCOL_BAD_MAC', 'HYDRA_PROTOCOL_BAD_CRC'].includes((e as { code: string }).code) && (!fixCrc || (e as { code: string }).code === 'HYDRA_PROTOCOL_BAD_MAC'));
    await r.close().catch(() => undefined);
    await relay.close();
  }
  // Untouched, the same read works.
  const r = await client(s.address, 'rd', 1, { role: 'reader' });
  assert.ok((await r.readPages([{ offset: 0, length: RAM }])).equals(prng(12, RAM)));
  await r.close();
});
