import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { encodePages } from '../protocol/index.js';
import { JOURNAL_HEADER_SIZE, JournalWriter, RecordType, encodeJournalHeader, encodeRecordHeader, scanJournal } from './journal.js';
import { encodeMeta, readMeta } from './meta.js';
import { tmpDir } from '../../test/support/store-data.js';

const code = (c: string) => (e: unknown) => {
  assert.equal((e as { code?: string }).code, c, (e as Error).message);
  return true;
};

test('journal header and record header golden bytes', () => {
  assert.equal(encodeJournalHeader(7).toString('hex'), '48564d4a' + '0001' + '0000' + '00000007' + encodeJournalHeader(7).subarray(12).toString('hex'));
  const h = encodeRecordHeader(RecordType.PAGES, 5, 2, 100, 0xdeadbeef);
  assert.equal(h.subarray(0, 20).toString('hex'), '0002' + '0000' + '00000005' + '00000002' + '00000064' + 'deadbeef');
  assert.equal(h.length, 24);
});

async function writeCheckpoint(file: string, epoch = 2): Promise<number> {
  const j = await JournalWriter.open(file, 1);
  await j.begin({ vm: 'v', generation: 1, epoch, kind: 'incremental', ramSize: 1 << 20, pageSize: 4096, startedAt: 'now' });
  await j.append(RecordType.PAGES, encodePages([{ offset: 0, length: 4096 }], Buffer.alloc(4096, 1)));
  await j.append(RecordType.PAGES, encodePages([{ offset: 8192, length: 8192 }], Buffer.alloc(8192, 2)));
  await j.append(RecordType.DEVSTATE, Buffer.from('device-state'));
  await j.append(RecordType.DISKS, Buffer.from(JSON.stringify({ ids: ['d1'] })));
  await j.end({ pages: 3, bytes: 12288, devstateSize: 12, devstateSha256: 'x' });
  const size = j.size;
  await j.close();
  return size;
}

test('a complete journalled checkpoint is found; every truncation is a torn tail', async () => {
  const dir = tmpDir();
  const file = path.join(dir, 'journal');
  const size = await writeCheckpoint(file);
  const ok = await scanJournal(file, 1);
  assert.equal(ok.torn, null);
  assert.ok(ok.checkpoint);
  assert.equal(ok.checkpoint.begin.epoch, 2);
  assert.deepEqual(ok.checkpoint.records.map((r) => RecordType[r.type]), ['BEGIN', 'PAGES', 'PAGES', 'DEVSTATE', 'DISKS', 'END']);
  assert.deepEqual(ok.checkpoint.disks, ['d1']);
  const full = fs.readFileSync(file);
  for (let cut = JOURNAL_HEADER_SIZE; cut < size; cut += 97) {
    fs.writeFileSync(file, full.subarray(0, cut));
    const r = await scanJournal(file, 1);
    assert.equal(r.checkpoint, null, `cut at ${cut}`);
    if (cut > JOURNAL_HEADER_SIZE) assert.ok(r.torn, `cut at ${cut} reported torn`);
  }
});

test('a flipped byte anywhere in a record makes it torn', async () => {
  const dir = tmpDir();
  const file = path.join(dir, 'journal');
  const size = await writeCheckpoint(file);
  const full = fs.readFileSync(file);
  for (let i = JOURNAL_HEADER_SIZE; i < size; i += 211) {
    const b = Buffer.from(full);
    b[i] ^= 0x40;
    fs.writeFileSync(file, b);
    const r = await scanJournal(file, 1);
    assert.equal(r.checkpoint, null, `flip at ${i}`);
    assert.ok(r.torn);
  }
});

test('records after END (an older, longer checkpoint) are ignored; wrong generation is discarded', async () => {
  const dir = tmpDir();
  const file = path.join(dir, 'journal');
  await writeCheckpoint(file);
  fs.appendFileSync(file, Buffer.alloc(5000, 0x55));
  assert.ok((await scanJournal(file, 1)).checkpoint);
  const r = await scanJournal(file, 2);
  assert.equal(r.checkpoint, null);
  assert.match(r.torn ?? '', /generation/);
  assert.deepEqual(await scanJournal(path.join(dir, 'none'), 1), { checkpoint: null, torn: null, validBytes: 0, fileSize: 0 });
});

test('journal of another format version is refused, not discarded', async () => {
  const dir = tmpDir();
  const file = path.join(dir, 'journal');
  const h = encodeJournalHeader(1);
  h.writeUInt16BE(9, 4);
  const { crc32 } = await import('node:zlib');
  h.writeUInt32BE(crc32(h.subarray(0, 12)), 12);
  fs.writeFileSync(file, h);
  await assert.rejects(scanJournal(file, 1), code('HYDRA_STORE_JOURNAL_VERSION'));
});

test('meta envelope: round trip, corruption and version are refused', async () => {
  const dir = tmpDir();
  const file = path.join(dir, 'meta.json');
  const meta = {
    vm: 'v', generation: 1, committedEpoch: 3, ramSize: 1 << 20, pageSize: 4096, memoryFile: 'memory.img',
    devstate: { file: 'devstate-3.bin', size: 10, sha256: 'a'.repeat(64) }, disks: ['x'], config: { a: [1, 'é', null] },
    createdAt: 't0', committedAt: 't1', epochs: [],
  };
  fs.writeFileSync(file, encodeMeta(meta));
  assert.deepEqual(await readMeta(file), meta);
  assert.equal(await readMeta(path.join(dir, 'absent.json')), null);
  const text = fs.readFileSync(file, 'utf8');
  fs.writeFileSync(file, text.replace('"committedEpoch":3', '"committedEpoch":4'));
  await assert.rejects(readMeta(file), code('HYDRA_STORE_META_CORRUPT'));
  fs.writeFileSync(file, text.slice(0, 40));
  await assert.rejects(readMeta(file), code('HYDRA_STORE_META_CORRUPT'));
  fs.writeFileSync(file, text.replace('"formatVersion":1', '"formatVersion":2'));
  await assert.rejects(readMeta(file), code('HYDRA_STORE_META_VERSION'));
  fs.writeFileSync(file, '');
  await assert.rejects(readMeta(file), code('HYDRA_STORE_META_CORRUPT'));
});
