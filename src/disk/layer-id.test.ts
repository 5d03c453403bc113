import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { encodeLayerId, parseLayerId } from './layer-id.js';
import { PIN_ALL, pinnedFiles, removePin, writePin } from './pins.js';
import { tmpDir } from '../../test/support/tmp.js';

test('layer ids round-trip, accept the short form, and reject garbage with a clear code', () => {
  const id = encodeLayerId({ disk: 1, epoch: 12, layer: '/shared/l/web/d1-abc123-12.qcow2' });
  assert.deepEqual(parseLayerId(id), { disk: 1, epoch: 12, layer: '/shared/l/web/d1-abc123-12.qcow2' });
  assert.ok(id.length < 4096, 'fits the store protocol limit');
  assert.deepEqual(parseLayerId('disk0=/a/b.qcow2'), { disk: 0, epoch: null, layer: '/a/b.qcow2' });
  for (const bad of ['', 'x', '{"v":2,"disk":0,"layer":"/a"}', '{"v":1,"disk":-1,"layer":"/a"}', '{"v":1,"disk":0,"layer":"rel.qcow2"}']) {
    assert.throws(() => parseLayerId(bad), (e: { code?: string }) => e.code === 'HYDRA_DISK_LAYER_ID_INVALID', bad);
  }
});

test('pins: written atomically, listed, removed; an unreadable pin stops all merging', async () => {
  const dir = tmpDir('pins');
  try {
    assert.equal((await pinnedFiles(dir)).size, 0);
    await writePin(dir, ['/l/a.qcow2'], ['/o/x.qcow2']);
    assert.deepEqual([...(await pinnedFiles(dir))], ['/l/a.qcow2']);
    await removePin(dir, ['/o/x.qcow2']);
    assert.equal((await pinnedFiles(dir)).size, 0);
    fs.writeFileSync(path.join(dir, 'pins', 'torn.json'), '{"layers": [');
    assert.ok((await pinnedFiles(dir)).has(PIN_ALL));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
