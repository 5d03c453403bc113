import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { guardWithWatchdog, monoNow, readWatchdogFeed, starvedReason, writeWatchdogFeed, type WatchdogFeed } from './watchdog.js';

const feed = (over: Partial<WatchdogFeed> = {}): WatchdogFeed => ({ vm: 'v', host: 'h1', generation: 3, proofMono: monoNow(), ttlMs: 1000, deadlineMono: monoNow() + 750, agentPid: 1, writtenAt: '', ...over });

test('a feed proves the lease until its deadline; a revoked or unreadable one never does', () => {
  const now = monoNow();
  assert.equal(starvedReason(undefined), undefined, 'no feed: not under HA, never starved');
  assert.equal(starvedReason(feed({ deadlineMono: now + 100 }), now), undefined);
  assert.match(starvedReason(feed({ proofMono: now - 900, deadlineMono: now - 150 }), now)!, /no proof of host h1's lease for 900 ms/);
  assert.match(starvedReason(feed({ revoked: 'generation 3 is stale' }), now)!, /revoked by the host agent: generation 3 is stale/);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hv-wd-'));
  try {
    const file = path.join(dir, 'watchdog.json');
    fs.writeFileSync(file, '{"torn":');
    assert.match(starvedReason(readWatchdogFeed(file))!, /unreadable watchdog feed/);
    writeWatchdogFeed(file, feed());
    assert.equal((fs.statSync(file).mode & 0o777), 0o600);
    assert.equal(starvedReason(readWatchdogFeed(file)), undefined);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('the guard fires once the feed starves, and not while it is fed', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hv-wd-'));
  try {
    const file = path.join(dir, 'watchdog.json');
    const fired: string[] = [];
    const guard = guardWithWatchdog(file, (r) => fired.push(r), 10);
    await new Promise((r) => setTimeout(r, 100));
    assert.deepEqual(fired, [], 'no file: unarmed');
    const feeder = setInterval(() => writeWatchdogFeed(file, feed({ deadlineMono: monoNow() + 200 })), 50);
    await new Promise((r) => setTimeout(r, 400));
    assert.deepEqual(fired, [], 'fed: alive');
    clearInterval(feeder);
    const stoppedAt = monoNow();
    while (fired.length === 0 && monoNow() - stoppedAt < 2000) await new Promise((r) => setTimeout(r, 5));
    const after = monoNow() - stoppedAt;
    assert.equal(fired.length, 1);
    assert.ok(after >= 150 && after < 1000, `fired ${after} ms after the last feed (deadline 200 ms after it)`);
    guard.stop();
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
