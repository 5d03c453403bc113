import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import fs from 'node:fs';
import { QmpClient } from './client.js';
import { QmpClosedError, QmpError, QmpTimeoutError } from '../errors.js';
import { tmpDir } from '../../test/support/tmp.js';

/**
 * A scripted QMP peer, to drive the client through orderings real QEMU rarely
 * produces (out-of-order replies, silence, a socket dying mid-command).
 * test/vm-lifecycle.test.ts exercises the client against real QEMU.
 */
function fakeQmp(onCommand: (cmd: { execute: string; id: string; arguments?: unknown }, sock: net.Socket) => void) {
  const dir = tmpDir('qmp');
  const sockPath = path.join(dir, 'qmp.sock');
  const server = net.createServer((sock) => {
    sock.write(JSON.stringify({ QMP: { version: { qemu: { major: 10, minor: 0, micro: 2 }, package: 'fake' }, capabilities: [] } }) + '\n');
    let buf = '';
    sock.on('data', (d) => {
      buf += d.toString();
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        const cmd = JSON.parse(line);
        if (cmd.execute === 'qmp_capabilities') sock.write(JSON.stringify({ return: {}, id: cmd.id }) + '\n');
        else onCommand(cmd, sock);
      }
    });
  });
  return new Promise<{ sockPath: string; close: () => void }>((resolve) =>
    server.listen(sockPath, () => resolve({ sockPath, close: () => { server.close(); fs.rmSync(dir, { recursive: true, force: true }); } })));
}

test('replies are matched to commands by id, even out of order; events are emitted', async () => {
  const held: { id: string; execute: string }[] = [];
  const peer = await fakeQmp((cmd, sock) => {
    held.push(cmd);
    if (held.length === 2) {
      sock.write(JSON.stringify({ event: 'STOP', timestamp: { seconds: 1, microseconds: 0 } }) + '\n');
      // Answer the second first, in one write with the first, split mid-line.
      const a = JSON.stringify({ return: { which: held[1]!.execute }, id: held[1]!.id }) + '\n';
      const b = JSON.stringify({ return: { which: held[0]!.execute }, id: held[0]!.id }) + '\n';
      const all = a + b;
      sock.write(all.slice(0, 10));
      setTimeout(() => sock.write(all.slice(10)), 20);
    }
  });
  const client = await QmpClient.connect(peer.sockPath);
  assert.equal(client.greeting.QMP.version.qemu.major, 10);
  const ev = client.waitEvent('STOP', 2000);
  const [r1, r2] = await Promise.all([client.execute('first'), client.execute('second')]);
  assert.deepEqual(r1, { which: 'first' });
  assert.deepEqual(r2, { which: 'second' });
  assert.equal((await ev).event, 'STOP');
  client.close();
  peer.close();
});

test('a QMP error reply rejects with QmpError carrying the class', async () => {
  const peer = await fakeQmp((cmd, sock) => sock.write(JSON.stringify({ error: { class: 'CommandNotFound', desc: 'The command nope has not been found' }, id: cmd.id }) + '\n'));
  const client = await QmpClient.connect(peer.sockPath);
  await assert.rejects(client.execute('nope'), (err: unknown) => err instanceof QmpError && err.qmpClass === 'CommandNotFound' && /nope/.test(err.message));
  client.close();
  peer.close();
});

test('a command without reply times out; a socket closed mid-command rejects instead of hanging', async () => {
  const peer = await fakeQmp((cmd, sock) => {
    if (cmd.execute === 'die') sock.destroy();
  });
  const client = await QmpClient.connect(peer.sockPath, { label: 'VM t1' });
  await assert.rejects(client.execute('silent', undefined, { timeoutMs: 100 }), QmpTimeoutError);
  await assert.rejects(client.execute('die'), (err: unknown) => err instanceof QmpClosedError && /VM t1/.test((err as Error).message));
  await assert.rejects(client.execute('after-close'), QmpClosedError);
  peer.close();
});

test('connecting to a missing socket fails with a clear error', async () => {
  await assert.rejects(QmpClient.connect('/nonexistent/qmp.sock', { timeoutMs: 500 }), (err: unknown) => err instanceof QmpClosedError && /nonexistent/.test((err as Error).message));
});
