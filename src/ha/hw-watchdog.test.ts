import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { HwWatchdog } from './hw-watchdog.js';
import { monoNow } from '../vm/watchdog.js';

/**
 * The device protocol against a plain file standing in for /dev/watchdog
 * (opening the real device on this machine would arm a host reset): a byte
 * per fresh lease proof, nothing for a stale one, 'V' on a clean stop.
 */
test('hardware watchdog: fed on fresh proofs only, magic close on stop, timeout checked against the TTL', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hv-hwwd-'));
  try {
    const device = path.join(dir, 'watchdog');
    fs.writeFileSync(device, '');
    assert.throws(() => new HwWatchdog({ device, timeoutSec: 1, leaseTtlSec: 1 }), /HYDRA_HA_HW_WATCHDOG|two thirds/);
    assert.throws(() => new HwWatchdog({ device: path.join(dir, 'none', 'wd'), timeoutSec: 5, leaseTtlSec: 10 }).open(), (e: Error & { code?: string }) => e.code === 'HYDRA_HA_HW_WATCHDOG');
    const wd = new HwWatchdog({ device, timeoutSec: 5, leaseTtlSec: 10 });
    wd.open();
    wd.feed(monoNow(), 10_000);
    wd.feed(monoNow() - 1000, 10_000);
    wd.feed(monoNow() - 6000, 10_000); // a reset 5 s from now would come after the lease could expire
    assert.equal(wd.feeds, 2);
    assert.equal(wd.skipped, 1);
    wd.close();
    assert.equal(fs.readFileSync(device, 'latin1'), '\0\0V');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
