import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { encodeCommand, parseReply, RespErrorReply, redisOnce } from './resp.js';
import { RedisWatcher, summarizeWatch, lossReport, lastAcked, type WatchRecord } from './redis-watcher.js';

test('RESP: commands encode as bulk-string arrays; replies parse, incomplete ones wait', () => {
  assert.equal(encodeCommand(['SET', 'k', 12]).toString(), '*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n');
  assert.deepEqual(parseReply(Buffer.from(':42\r\n')), { value: 42, next: 5 });
  assert.deepEqual(parseReply(Buffer.from('+OK\r\n')), { value: 'OK', next: 5 });
  assert.deepEqual(parseReply(Buffer.from('$-1\r\n')), { value: null, next: 5 });
  assert.deepEqual(parseReply(Buffer.from('$5\r\nhello\r\n')), { value: 'hello', next: 11 });
  assert.equal(parseReply(Buffer.from('$5\r\nhel')), undefined);
  assert.deepEqual(parseReply(Buffer.from('*2\r\n:1\r\n$1\r\na\r\n'))!.value, [1, 'a']);
  assert.ok(parseReply(Buffer.from('-ERR wrong\r\n'))!.value instanceof RespErrorReply);
  assert.throws(() => parseReply(Buffer.from('?x\r\n')), /not a RESP type/);
});

test('summary: longest gap, first reply after a kill, acknowledged writes lost', () => {
  const r = (t: number, op: WatchRecord['op'], value?: number, ok = true): WatchRecord => ({ t, op, ok, value, ms: 1 });
  const recs = [r(0, 'connect'), r(1, 'get', 0), r(10, 'incr', 1), r(20, 'set', 1), r(30, 'incr', 2), r(40, 'set', 2),
    r(50, 'incr', 3, false), r(900, 'connect'), r(1000, 'get', 1), r(1010, 'incr', 2), r(1020, 'set', 3)];
  const s = summarizeWatch(recs, 45);
  assert.equal(s.longestGapMs, 960);
  assert.equal(s.longestGapFrom, 40);
  assert.equal(s.firstReplyAfterKillMs, 955);
  assert.equal(s.lastAckedCounter, 2);
  assert.equal(s.lastAckedSeq, 3);
  assert.equal(s.failures, 1);
  assert.equal(lastAcked(recs, 'incr', 45), 2);
  assert.deepEqual(lossReport(recs, 45), { ackedBeforeKill: 2, found: 1, lostAcked: 1 });
});

/**
 * A stand-in RESP server (INCR, SET, GET on a map) that can drop every
 * connection and refuse new ones for a while, like a VM that dies and comes
 * back. The real thing, redis in a Debian VM, is in test/long/debian-vm.test.ts.
 */
function fakeRedis(): Promise<{ port: number; outage(ms: number): void; close(): void; data: Map<string, string> }> {
  const data = new Map<string, string>();
  const sockets = new Set<net.Socket>();
  let down = false;
  const server = net.createServer((s) => {
    if (down) return void s.destroy();
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    let buf = Buffer.alloc(0);
    s.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      for (;;) {
        const p = parseReply(buf);
        if (!p) return;
        buf = buf.subarray(p.next);
        const [cmd, key, val] = p.value as string[];
        if (cmd === 'INCR') { const n = Number(data.get(key!) ?? 0) + 1; data.set(key!, String(n)); s.write(`:${n}\r\n`); }
        else if (cmd === 'SET') { data.set(key!, val!); s.write('+OK\r\n'); }
        else if (cmd === 'GET') { const v = data.get(key!); s.write(v === undefined ? '$-1\r\n' : `$${v.length}\r\n${v}\r\n`); }
        else s.write(`-ERR unknown command ${cmd}\r\n`);
      }
    });
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({
    port: (server.address() as net.AddressInfo).port,
    data,
    outage(ms) { down = true; for (const s of sockets) s.destroy(); setTimeout(() => { down = false; }, ms); },
    close() { for (const s of sockets) s.destroy(); server.close(); },
  })));
}

test('watcher: reconnects after an outage without resending, every reply recorded in order', async () => {
  const srv = await fakeRedis();
  const w = new RedisWatcher({ host: '127.0.0.1', port: srv.port, timeoutMs: 300, retryMs: 20, pauseMs: 2 }).start();
  await new Promise((r) => setTimeout(r, 200));
  const killAt = Date.now();
  srv.outage(400);
  await new Promise((r) => setTimeout(r, 700));
  const recs = await w.stop();
  srv.close();
  const s = summarizeWatch(recs, killAt);
  assert.ok(s.longestGapMs >= 350, `gap ${s.longestGapMs} covers the outage`);
  assert.ok(s.firstReplyAfterKillMs !== null && s.firstReplyAfterKillMs >= 350);
  // Acknowledged increments are consecutive: nothing was applied twice or skipped.
  const incs = recs.filter((r) => r.ok && r.op === 'incr').map((r) => r.value!);
  assert.deepEqual(incs, incs.map((_, i) => i + 1));
  assert.equal(Number(srv.data.get('hydra:counter')), incs.at(-1));
  assert.deepEqual(lossReport(recs, killAt).lostAcked, 0, 'the stand-in kept its state');
  const times = recs.map((r) => r.t);
  assert.deepEqual(times, [...times].sort((a, b) => a - b));
});

test('redisOnce: a refused connection names the address', async () => {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  srv.close();
  await assert.rejects(redisOnce('127.0.0.1', port, ['PING'], 500), (err: Error & { code?: string }) => {
    assert.equal(err.code, 'HYDRA_REDIS_CONNECT');
    assert.match(err.message, new RegExp(`127\\.0\\.0\\.1:${port}`));
    return true;
  });
});
