import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseAssignment } from './assignment-schema.js';

const good = { kind: 'restore', vm: 'web1', host: 'h2', generation: 7, imageGeneration: 6, store: '127.0.0.1:7400', mode: 'network', intervalMs: 1000, createdAt: 1, by: 'manager-1' };
const raw = (over: Record<string, unknown>) => JSON.stringify({ ...good, ...over });

test('a manager-written assignment parses', () => {
  assert.deepEqual(parseAssignment(JSON.stringify(good), 'h2', 'web1'), good);
  assert.equal(parseAssignment(raw({ mode: 'file', storeDir: '/srv/store' }), 'h2', 'web1').storeDir, '/srv/store');
  // Copy-on-write protection travels with the assignment, so a restored incarnation is protected the same way.
  assert.deepEqual(parseAssignment(raw({ cow: { grain: 65536 } }), 'h2', 'web1').cow, { grain: 65536 });
  assert.deepEqual(parseAssignment(raw({ cow: {} }), 'h2', 'web1').cow, {});
  // The cluster's active store, looked up in etcd by the agent.
  assert.equal(parseAssignment(raw({ store: 'cluster' }), 'h2', 'web1').store, 'cluster');
});

test('malformed assignments are refused, naming the key and the field', () => {
  const bad: [Record<string, unknown> | string, RegExp][] = [
    ['{nope', /is not JSON/],
    [{ vm: '../../etc' }, /vm /],
    [{ vm: 'other' }, /names VM "other"/],
    [{ host: 'h3' }, /names host "h3"/],
    [{ generation: -1 }, /generation/],
    [{ generation: 2 ** 40 }, /generation/],
    [{ generation: 0 }, /generation of at least 1/],
    [{ imageGeneration: undefined }, /imageGeneration/],
    [{ store: 'http://evil/x' }, /store/],
    [{ store: 'CLUSTER' }, /store/],
    [{ mode: 'disk' }, /mode/],
    [{ mode: 'file' }, /storeDir/],
    [{ mode: 'file', storeDir: 'relative/dir' }, /storeDir/],
    [{ mode: 'file', storeDir: '/a/../etc' }, /storeDir/],
    [{ intervalMs: 0 }, /intervalMs/],
    [{ kind: 'exec' }, /kind/],
    [{ extra: 'field' }, /extra|Unrecognized/i],
    [{ cow: { grain: 48 * 1024 } }, /cow\.grain/],
    [{ cow: { grain: 1024 } }, /cow\.grain/],
    [{ cow: true }, /cow/],
  ];
  for (const [over, re] of bad) {
    const text = typeof over === 'string' ? over : raw(over);
    assert.throws(() => parseAssignment(text, 'h2', 'web1'), (err: Error & { code?: string }) => {
      assert.equal(err.code, 'HYDRA_HA_BAD_ASSIGNMENT');
      assert.match(err.message, /\/hydravm\/assignments\/h2\/web1/);
      assert.match(err.message, re);
      return true;
    }, text);
  }
});
