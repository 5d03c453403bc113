import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { killProcess } from './kill.js';
import { procStartTime, pidAlive } from '../util/pid.js';

test('a recorded PID is signalled only while its start time (or command line) still matches', async () => {
  const child = spawn('sleep', ['30'], { stdio: 'ignore' });
  const exited = new Promise((r) => child.on('exit', r));
  const pid = child.pid!;
  const start = procStartTime(pid)!;
  assert.match(start, /^\d+$/);
  assert.equal(killProcess(pid, { startTime: String(Number(start) - 1) }), false, 'another process that once had this PID: left alone');
  assert.equal(killProcess(pid, { cmdline: ['internal-checkpoint', 'x'] }), false, 'a command line that does not match: left alone');
  assert.equal(killProcess(pid, {}), false, 'no identity: nothing is sent');
  assert.ok(pidAlive(pid));
  assert.equal(killProcess(pid, { cmdline: ['sleep', '30'] }, 'SIGTERM'), true);
  await exited;
  assert.equal(killProcess(pid, { startTime: start }), false, 'gone: nothing to kill');
});
