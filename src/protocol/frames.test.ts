import { test } from 'node:test';
import assert from 'node:assert/strict';
import { crc32 } from 'node:zlib';
import * as nodeCrypto from 'node:crypto';
import {
  FrameDecoder, FrameFlag, FrameMac, FrameType, FRAME_HEADER_SIZE, FRAME_TAG_SIZE, MAX_PREAUTH_PAYLOAD, PROTOCOL_VERSION, encodeFrame,
  beginSchema, welcomeSchema, batchRuns, decodeHot, decodeJson, decodePages, encodeHot, encodePages, encodeRunTable, helloSchema,
} from './index.js';

const code = (c: string) => (e: unknown) => (e as { code?: string }).code === c;

test('frame golden bytes', () => {
  assert.equal(PROTOCOL_VERSION, 2);
  const f = encodeFrame(FrameType.COMMIT, Buffer.from('{}'), { flags: FrameFlag.MORE });
  // magic "HVMP", version 2, type 10 (COMMIT), flags 1, length 2, crc32("{}") = 0xa3a6bf43, payload "{}"
  assert.equal(f.toString('hex'), '48564d50' + '0002' + '000a' + '00000001' + '00000002' + 'a3a6bf43' + '7b7d');
  const [d] = new FrameDecoder().push(Buffer.from('48564d500002000a0000000100000002a3a6bf437b7d', 'hex'));
  assert.equal(d!.type, FrameType.COMMIT);
  assert.equal(d!.flags, FrameFlag.MORE);
  assert.equal(d!.payload.toString(), '{}');
});

test('golden: fixed HELLO frame decodes', () => {
  const nonce = 'ab'.repeat(32);
  const payload = Buffer.from(`{"minVersion":2,"maxVersion":2,"vm":"web1","generation":3,"role":"checkpointer","nonce":"${nonce}"}`);
  const hex = '48564d50' + '0002' + '0001' + '00000000' + payload.length.toString(16).padStart(8, '0') + crc32(payload).toString(16).padStart(8, '0');
  const bytes = Buffer.concat([Buffer.from(hex, 'hex'), payload]);
  assert.equal(bytes.length, FRAME_HEADER_SIZE + payload.length);
  const [f] = new FrameDecoder().push(bytes);
  assert.equal(f!.type, FrameType.HELLO);
  assert.deepEqual(decodeJson(f!.type, f!.payload, helloSchema), { minVersion: 2, maxVersion: 2, vm: 'web1', generation: 3, role: 'checkpointer', nonce });
  assert.deepEqual(encodeFrame(FrameType.HELLO, payload), bytes);
});

test('decoder reassembles frames split at every byte', () => {
  const a = encodeFrame(FrameType.PAGES, encodePages([{ offset: 4096, length: 8 }], Buffer.from('abcdefgh')));
  const b = encodeFrame(FrameType.DEVSTATE, Buffer.from('xyz'));
  const all = Buffer.concat([a, b]);
  const d = new FrameDecoder();
  const frames = [];
  for (let i = 0; i < all.length; i++) frames.push(...d.push(all.subarray(i, i + 1)));
  assert.equal(frames.length, 2);
  const p = decodePages(frames[0]!.payload);
  assert.deepEqual(p.runs, [{ offset: 4096, length: 8 }]);
  assert.equal(p.data.toString(), 'abcdefgh');
  assert.equal(frames[1]!.payload.toString(), 'xyz');
  assert.equal(d.midFrame, false);
});

test('bad magic is refused', () => {
  const f = encodeFrame(FrameType.COMMIT, Buffer.from('{}'));
  f[0] = 0x47;
  assert.throws(() => new FrameDecoder().push(f), code('HYDRA_PROTOCOL_BAD_MAGIC'));
});

test('bad crc is refused', () => {
  const f = encodeFrame(FrameType.COMMIT, Buffer.from('{}'));
  f[f.length - 1] ^= 1;
  assert.throws(() => new FrameDecoder().push(f), code('HYDRA_PROTOCOL_BAD_CRC'));
});

test('truncated frame yields nothing and is reported as mid-frame', () => {
  const f = encodeFrame(FrameType.DEVSTATE, Buffer.alloc(100, 1));
  const d = new FrameDecoder();
  assert.deepEqual(d.push(f.subarray(0, 10)), []);
  assert.equal(d.midFrame, true);
  assert.deepEqual(d.push(f.subarray(10, 60)), []);
  assert.equal(d.midFrame, true);
  assert.equal(d.push(f.subarray(60)).length, 1);
});

test('oversize length is an error, not an allocation', () => {
  const h = encodeFrame(FrameType.PAGES, Buffer.alloc(0));
  h.writeUInt32BE(0xfffffff0, 12);
  assert.throws(() => new FrameDecoder().push(h), (e: unknown) => code('HYDRA_PROTOCOL_FRAME_TOO_LARGE')(e) && /4294967280/.test((e as Error).message));
  const small = new FrameDecoder({ maxPayload: 10 });
  assert.throws(() => small.push(encodeFrame(FrameType.DEVSTATE, Buffer.alloc(11))), code('HYDRA_PROTOCOL_FRAME_TOO_LARGE'));
});

test('version mismatch names both versions; HELLO and ERROR pass at any version', () => {
  const f = encodeFrame(FrameType.COMMIT, Buffer.from('{}'), { version: 9 });
  assert.throws(() => new FrameDecoder().push(f), (e: unknown) => code('HYDRA_PROTOCOL_VERSION')(e) && /version 9/.test((e as Error).message) && /version 2/.test((e as Error).message));
  assert.equal(new FrameDecoder().push(encodeFrame(FrameType.HELLO, Buffer.from('{}'), { version: 9 })).length, 1);
  assert.equal(new FrameDecoder().push(encodeFrame(FrameType.ERROR, Buffer.from('{}'), { version: 9 })).length, 1);
});

test('unknown frame type is refused', () => {
  const f = encodeFrame(FrameType.COMMIT, Buffer.from('{}'));
  f.writeUInt16BE(999, 6);
  assert.throws(() => new FrameDecoder().push(f), code('HYDRA_PROTOCOL_BAD_TYPE'));
});

test('a failed decoder stays failed', () => {
  const d = new FrameDecoder();
  assert.throws(() => d.push(Buffer.from('garbage-garbage-garbage')));
  assert.throws(() => d.push(encodeFrame(FrameType.COMMIT, Buffer.from('{}'))), code('HYDRA_PROTOCOL_DECODER_FAILED'));
});

test('PAGES payload layout and validation', () => {
  const p = encodePages([{ offset: 0x100000000, length: 2 }, { offset: 8192, length: 1 }], Buffer.from('abc'));
  assert.equal(p.toString('hex'), '00000002' + '0000000100000000' + '00000002' + '0000000000002000' + '00000001' + '616263');
  const d = decodePages(p);
  assert.deepEqual(d.runs, [{ offset: 0x100000000, length: 2 }, { offset: 8192, length: 1 }]);
  assert.throws(() => decodePages(p.subarray(0, p.length - 1)), code('HYDRA_PROTOCOL_BAD_PAYLOAD'));
  assert.throws(() => decodePages(Buffer.from('00000100', 'hex')), code('HYDRA_PROTOCOL_BAD_PAYLOAD'));
  assert.throws(() => encodePages([{ offset: 0, length: 4 }], Buffer.from('abc')), code('HYDRA_PROTOCOL_BAD_RUN'));
  const t = encodeRunTable([{ offset: 4096, length: 4096 }]);
  assert.deepEqual(decodePages(t, false).runs, [{ offset: 4096, length: 4096 }]);
  assert.throws(() => decodePages(Buffer.concat([t, Buffer.from('x')]), false), code('HYDRA_PROTOCOL_BAD_PAYLOAD'));
});

test('batchRuns splits by data size without copying', () => {
  const data = Buffer.from('aaaabbbbccccdddd');
  const runs = [{ offset: 0, length: 4 }, { offset: 4, length: 4 }, { offset: 100, length: 8 }];
  const out = [...batchRuns(runs, data, 6)];
  assert.deepEqual(out.map((b) => b.runs), [[{ offset: 0, length: 6 }], [{ offset: 6, length: 2 }, { offset: 100, length: 4 }], [{ offset: 104, length: 4 }]]);
  assert.deepEqual(out.map((b) => b.data!.toString()), ['aaaabb', 'bbcccc', 'dddd']);
});

test('JSON payload validation names the frame', () => {
  assert.throws(() => decodeJson(FrameType.HELLO, Buffer.from('{"vm":"x"}'), helloSchema), (e: unknown) => code('HYDRA_PROTOCOL_BAD_PAYLOAD')(e) && /HELLO/.test((e as Error).message));
  assert.throws(() => decodeJson(FrameType.HELLO, Buffer.from('not json'), helloSchema), code('HYDRA_PROTOCOL_BAD_PAYLOAD'));
});

test('HOT payload round trip and validation', () => {
  const regions = [{ offset: 7 * 2 * 1024 * 1024, score: 40 }, { offset: 0, score: 0.0625 }, { offset: 2 ** 40, score: 1e-9 }];
  const p = encodeHot(regions);
  assert.equal(p.length, 4 + 3 * 16);
  assert.equal(p.readUInt32BE(0), 3);
  assert.deepEqual(decodeHot(p), regions);
  assert.deepEqual(decodeHot(encodeHot([])), []);
  assert.throws(() => decodeHot(p.subarray(0, p.length - 1)), code('HYDRA_PROTOCOL_BAD_PAYLOAD'));
  assert.throws(() => decodeHot(Buffer.alloc(2)), code('HYDRA_PROTOCOL_BAD_PAYLOAD'));
  assert.throws(() => encodeHot([{ offset: -1, score: 1 }]), code('HYDRA_PROTOCOL_BAD_PAYLOAD'));
  assert.throws(() => encodeHot([{ offset: 0, score: NaN }]), code('HYDRA_PROTOCOL_BAD_PAYLOAD'));
  // New frame types decode; old ones keep their numbers.
  assert.equal(FrameType.ABORT, 17);
  assert.equal(FrameType.GET_HOT, 18);
  assert.equal(FrameType.HOT, 19);
  const [f] = new FrameDecoder().push(encodeFrame(FrameType.HOT, p, { flags: FrameFlag.MORE }));
  assert.equal(f!.type, FrameType.HOT);
  assert.deepEqual(decodeHot(f!.payload), regions);
});

test('golden: a tagged frame (key 32 x 0x01, sequence 0)', () => {
  const key = Buffer.alloc(32, 1);
  const f = encodeFrame(FrameType.COMMIT, Buffer.from('{}'), { mac: new FrameMac(key) });
  assert.equal(f.length, FRAME_HEADER_SIZE + 2 + FRAME_TAG_SIZE);
  assert.equal(f.readUInt32BE(8), FrameFlag.MAC);
  // HMAC-SHA256(key, u64 0 || header || payload), first 16 bytes
  const { createHmac } = nodeCrypto;
  const expected = createHmac('sha256', key).update(Buffer.alloc(8)).update(f.subarray(0, 20)).update(Buffer.from('{}')).digest().subarray(0, 16);
  assert.deepEqual(f.subarray(22), expected);
  const d = new FrameDecoder();
  d.setReceiveMac({ mac: new FrameMac(key), peer: 'test' });
  const [g] = d.push(f);
  assert.equal(g!.authenticated, true);
});

test('tags refuse replay, reorder, a flip anywhere, a wrong key and a tag before keys exist', () => {
  const key = Buffer.alloc(32, 7);
  const tx = new FrameMac(key);
  const a = encodeFrame(FrameType.PAGES, encodePages([{ offset: 0, length: 8 }], Buffer.from('abcdefgh')), { mac: tx });
  const b = encodeFrame(FrameType.COMMIT, Buffer.from('{}'), { mac: tx });
  const rx = () => {
    const d = new FrameDecoder();
    d.setReceiveMac({ mac: new FrameMac(key), peer: 'test' });
    return d;
  };
  assert.equal(rx().push(Buffer.concat([a, b])).length, 2);
  assert.throws(() => rx().push(Buffer.concat([a, a])), code('HYDRA_PROTOCOL_BAD_MAC'), 'replayed frame');
  assert.throws(() => rx().push(Buffer.concat([b, a])), code('HYDRA_PROTOCOL_BAD_MAC'), 'reordered frames');
  assert.throws(() => rx().push(b), code('HYDRA_PROTOCOL_BAD_MAC'), 'dropped first frame');
  // Flip every bit position class of the frame: header fields, page data (CRC fixed up), tag.
  for (let i = 4; i < a.length; i++) {
    const x = Buffer.from(a);
    x[i]! ^= 0x10;
    if (i >= FRAME_HEADER_SIZE && i < a.length - FRAME_TAG_SIZE) x.writeUInt32BE(crc32(x.subarray(FRAME_HEADER_SIZE, a.length - FRAME_TAG_SIZE)), 16);
    let out: unknown[] = [];
    // A flipped length field makes the decoder wait for bytes that never come: no frame either way.
    assert.throws(() => { out = rx().push(x); if (i >= 12 && i < 16 && out.length === 0) throw Object.assign(new Error('waits'), { code: 'WAITS' }); }, (e: unknown) => typeof (e as { code?: string }).code === 'string', `flip at byte ${i}`);
  }
  const wrong = new FrameDecoder();
  wrong.setReceiveMac({ mac: new FrameMac(Buffer.alloc(32, 8)), peer: 'test' });
  assert.throws(() => wrong.push(a), code('HYDRA_PROTOCOL_BAD_MAC'));
  assert.throws(() => new FrameDecoder().push(a), code('HYDRA_PROTOCOL_UNEXPECTED'));
});

test('pre-authentication frame limit and u32 ranges', () => {
  const d = new FrameDecoder({ maxPayload: MAX_PREAUTH_PAYLOAD });
  assert.throws(() => d.push(encodeFrame(FrameType.HELLO, Buffer.alloc(MAX_PREAUTH_PAYLOAD + 1))), code('HYDRA_PROTOCOL_FRAME_TOO_LARGE'));
  assert.equal(MAX_PREAUTH_PAYLOAD, 4096);
  const hello = { minVersion: 2, maxVersion: 2, vm: 'v', role: 'checkpointer', nonce: 'ab'.repeat(32) };
  assert.equal(helloSchema.safeParse({ ...hello, generation: 0xffffffff }).success, true);
  assert.equal(helloSchema.safeParse({ ...hello, generation: 2 ** 32 }).success, false);
  assert.equal(helloSchema.safeParse({ ...hello, generation: 2 ** 40 }).success, false);
  assert.equal(beginSchema.safeParse({ epoch: 2 ** 32, kind: 'full', ramSize: 4096 }).success, false);
  assert.equal(welcomeSchema.safeParse({ version: 2, vm: 'v', generation: 1, highestGeneration: 2 ** 33, committedEpoch: null, proof: 'ab'.repeat(32), idleTimeoutMs: 1000 }).success, false);
});
