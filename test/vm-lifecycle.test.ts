import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { makeLab, pidAlive, sleep } from './support/lab.js';
import { QmpClient } from '../src/qmp/index.js';
import { lastMemcheckProgress, waitForMemcheckStep, countViolations } from '../src/vm/serial.js';

const lab = makeLab('life');
after(() => lab.cleanup());

interface VmJson { name: string; state: string; qemuPid: number | null; supervisorPid: number | null; qmpSocket: string; serialLog: string; live: boolean }

function statusJson(name: string): VmJson {
  const r = lab.cli(['vm', 'status', name, '--json']);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout) as VmJson;
}

test('a VM runs memcheck, pauses and resumes over QMP, and stops leaving no process', async () => {
  const spec = lab.writeSpec('life1', {});
  const start = lab.cli(['vm', 'start', spec]);
  assert.equal(start.code, 0, start.stderr);
  assert.match(start.stdout, /VM life1 is running/);

  const st = statusJson('life1');
  assert.equal(st.state, 'running');
  assert.ok(pidAlive(st.qemuPid), 'QEMU pid is alive');
  const listed = JSON.parse(lab.cli(['vm', 'list', '--json']).stdout) as VmJson[];
  assert.deepEqual(listed.map((v) => [v.name, v.state, v.qemuPid]), [['life1', 'running', st.qemuPid]]);
  assert.match(lab.cli(['vm', 'list']).stdout, /life1\s+running/);

  // The guest's own progress, on its serial console, within 15 s of starting (TCG).
  const first = await waitForMemcheckStep(st.serialLog, 2, 60_000);
  assert.equal(first.violations, 0);

  // stop over the user QMP socket: progress halts...
  const qmp = await QmpClient.connect(st.qmpSocket);
  await qmp.execute('stop');
  assert.equal(statusJson('life1').state, 'paused');
  await sleep(500);
  const frozen = lastMemcheckProgress(st.serialLog)!;
  await sleep(2000);
  assert.equal(lastMemcheckProgress(st.serialLog)!.step, frozen.step, 'no progress while paused');
  // ...and resumes on cont.
  await qmp.execute('cont');
  await waitForMemcheckStep(st.serialLog, frozen.step + 2, 60_000);
  qmp.close();
  assert.equal(countViolations(st.serialLog), 0);

  // A second start of the same spec is refused and leaves the first alone.
  const again = lab.cli(['vm', 'start', spec]);
  assert.notEqual(again.code, 0);
  assert.match(again.stderr, /VM "life1" is already running/);
  assert.ok(pidAlive(st.qemuPid));

  const stop = lab.cli(['vm', 'stop', 'life1']);
  assert.equal(stop.code, 0, stop.stderr);
  assert.ok(!pidAlive(st.qemuPid), 'QEMU gone');
  assert.ok(!pidAlive(st.supervisorPid), 'supervisor gone');
  assert.ok(!fs.existsSync(st.qmpSocket), 'QMP socket removed');
  const after = statusJson('life1');
  assert.equal(after.state, 'stopped');
  assert.equal(after.live, false);
});

test('the VM outlives the command that started it and a killed QEMU is reported as crashed', async () => {
  const spec = lab.writeSpec('life2', {});
  assert.equal(lab.cli(['vm', 'start', spec]).code, 0);
  const st = statusJson('life2');
  process.kill(st.qemuPid!, 'SIGKILL');
  await sleep(500);
  const after = statusJson('life2');
  assert.equal(after.state, 'crashed');
  assert.ok(!pidAlive(st.supervisorPid));
  // The name is free again: a new start works and boots.
  const again = lab.cli(['vm', 'start', spec]);
  assert.equal(again.code, 0, again.stderr);
  assert.equal(lab.cli(['vm', 'stop', 'life2']).code, 0);
});

test('bad input: one clear error line, non-zero exit, nothing left half-started', () => {
  const cases: { name: string; fields?: Record<string, unknown>; env?: NodeJS.ProcessEnv; err: RegExp; setup?: () => void }[] = [
    { name: 'bad1', fields: { kernel: '/nonexistent/vmlinuz' }, err: /kernel \/nonexistent\/vmlinuz does not exist/ },
    { name: 'bad2', fields: { accel: 'xen' }, err: /accel/ },
    { name: 'bad3', env: { HYDRAVM_QEMU: '/nonexistent/qemu' }, err: /QEMU binary "\/nonexistent\/qemu" not found/ },
    {
      name: 'bad4',
      fields: { disks: [{ path: 'notqcow.img' }] },
      setup: () => fs.writeFileSync(path.join(lab.home, 'notqcow.img'), 'this is not a disk image'),
      err: /VM "bad4": disk .*notqcow\.img is raw, not qcow2/,
    },
  ];
  for (const c of cases) {
    c.setup?.();
    const spec = lab.writeSpec(c.name, c.fields ?? {});
    const r = lab.cli(['vm', 'start', spec], { env: c.env });
    assert.notEqual(r.code, 0, `${c.name} must fail`);
    assert.match(r.stderr, c.err, `${c.name}: ${r.stderr}`);
    assert.equal(r.stderr.trim().split('\n').length, 1, `${c.name}: one error line, got: ${r.stderr}`);
    const dir = path.join(lab.home, 'vms', c.name);
    for (const sock of ['qmp.sock', 'supervisor.qmp', 'hydra.qmp', 'control.sock']) assert.ok(!fs.existsSync(path.join(dir, sock)), `${c.name}: stale ${sock}`);
    try {
      const st = JSON.parse(fs.readFileSync(path.join(dir, 'state.json'), 'utf8'));
      assert.ok(!pidAlive(st.qemuPid) && !pidAlive(st.supervisorPid), `${c.name}: orphan process`);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
  }
  // QEMU refusing to start (here: a kernel file that is no kernel) is reported with its own words, and leaves nothing.
  fs.writeFileSync(path.join(lab.home, 'junk-kernel'), 'not a kernel');
  const junk = lab.cli(['vm', 'start', lab.writeSpec('bad5', { kernel: 'junk-kernel' })]);
  assert.notEqual(junk.code, 0);
  assert.match(junk.stderr, /VM "bad5" failed to start: QEMU exited during start/);
  assert.equal(junk.stderr.trim().split('\n').length, 1, junk.stderr);
  for (const sock of ['qmp.sock', 'supervisor.qmp', 'hydra.qmp', 'control.sock']) assert.ok(!fs.existsSync(path.join(lab.home, 'vms', 'bad5', sock)), `bad5: stale ${sock}`);
  // After a failed start the name works again with a good spec.
  const good = lab.writeSpec('bad4', {});
  const r = lab.cli(['vm', 'start', good]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(lab.cli(['vm', 'stop', 'bad4']).code, 0);
});
