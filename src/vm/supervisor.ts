import fs from 'node:fs';
import http from 'node:http';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { shimPath } from '../config/paths.js';
import { connectWhenReady, type QmpClient } from '../qmp/index.js';
import { vmLog } from '../util/log.js';
import { buildQemuArgs, type QemuLaunchOptions } from './qemu-args.js';
import { vmPaths, shellPaths, writeState, readStateAt, removeStaleSockets, type VmPaths, type VmState } from './runtime.js';
import { moveShellFiles, SERIAL_CHARDEV } from './shell-files.js';
import { pidAlive } from '../util/pid.js';
import { procStartTime } from '../util/pid.js';
import { VmError } from '../errors.js';
import { guardWithWatchdog, type WatchdogGuard } from './watchdog.js';
import { guardCowProtection } from './cow-guard.js';
import { guardCheckpointPause } from './pause-guard.js';
import type { VmSpec } from './spec.js';
import { releaseNics } from './nics.js';
import { lastLines } from '../util/log-tail.js';

/** What `vm start` (or a restore) hands to the supervisor through spec.json. */
export interface LaunchFile {
  spec: VmSpec;
  launch: QemuLaunchOptions;
  qemuBinary: string;
  /** A restore shell: the device configuration it accepts and the process whose death ends it while idle. */
  shell?: { key: string; ownerPid: number };
}

/** Whom a supervisor serves: a VM, or a restore shell waiting for one (HOME/shells/ID). */
export type SupervisorTarget = { vm: string } | { shell: string };

/**
 * The VM supervisor: one detached process per VM that owns its QEMU. It exists
 * because QEMU must not `-daemonize` (the fork leaves the shim's userfaultfd
 * bound to the dead parent, see docs/design.md), yet the VM must outlive the
 * command that started it. It records the VM's lifecycle in state.json, sees
 * QEMU's death at once, and serves status/stop on control.sock.
 *
 * Under HA it is also the VM's watchdog: while watchdog.json exists, the host
 * agent must keep feeding it with proofs of its etcd lease; once the deadline
 * in it passes (agent dead, etcd unreachable) or the agent revokes it (stale
 * generation), the supervisor SIGKILLs QEMU by itself and records why. It
 * does not depend on the agent being alive to do so.
 */
export async function runSupervisor(target: SupervisorTarget): Promise<void> {
  const shellId = 'shell' in target ? target.shell : undefined;
  let name = 'vm' in target ? target.vm : `shell-${target.shell}`;
  let paths: VmPaths = shellId ? shellPaths(shellId) : vmPaths(name);
  let logger = shellId ? vmLog(name).child({ shell: shellId }) : vmLog(name);
  const launchFile = JSON.parse(fs.readFileSync(paths.spec, 'utf8')) as LaunchFile;
  let { spec } = launchFile;
  const { launch } = launchFile;
  for (const f of [paths.qmpSocket, paths.supervisorQmpSocket, paths.hydraQmpSocket, paths.controlSocket]) fs.rmSync(f, { force: true });

  let state: VmState = {
    name,
    lifecycle: 'starting',
    supervisorPid: process.pid,
    supervisorStartTime: procStartTime(process.pid),
    accel: launch.accel,
    memoryBytes: spec.memoryBytes,
    startedAt: new Date().toISOString(),
    ...(launchFile.shell ? { shellKey: launchFile.shell.key, ownerPid: launchFile.shell.ownerPid } : {}),
  };
  const save = () => writeState(state, paths.state);
  /** Idle restore shell (no VM adopted it yet). */
  let idleShell = shellId !== undefined;

  const qemuErr = fs.openSync(paths.qemuLog, 'a');
  let serialIn = shellId ? undefined : openSerialInput(paths.serialIn);
  const args = buildQemuArgs(spec, serialIn === undefined ? { ...paths, serialIn: undefined } : paths, launch);
  logger.info({ qemu: launchFile.qemuBinary, args }, 'starting QEMU');
  let qemu: ChildProcess;
  const spawnedAt = performance.now();
  try {
    qemu = spawn(launchFile.qemuBinary, args, {
      stdio: ['ignore', qemuErr, qemuErr],
      env: { ...process.env, LD_PRELOAD: shimPath },
    });
  } catch (err) {
    state.lifecycle = 'failed';
    state.reason = `cannot start ${launchFile.qemuBinary}: ${(err as Error).message}`;
    save();
    return;
  }
  let qemuExited = false;
  let stopping = false;
  let selfFenced: string | undefined;
  const exited = new Promise<void>((resolve) => {
    qemu.on('error', (err) => {
      qemuExited = true;
      state.lifecycle = 'failed';
      state.reason = `cannot start ${launchFile.qemuBinary}: ${err.message}`;
      resolve();
    });
    qemu.on('exit', (code, signal) => {
      qemuExited = true;
      state.exitCode = code;
      state.exitSignal = signal;
      state.endedAt = new Date().toISOString();
      if (selfFenced) {
        state.lifecycle = 'crashed';
        state.reason = `self-fenced: ${selfFenced}`;
      } else if (state.lifecycle === 'starting') {
        state.lifecycle = 'failed';
        state.reason = `QEMU exited during start (code ${code}, signal ${signal}): ${lastLines(paths.qemuLog)}`;
      } else if (stopping) {
        state.lifecycle = 'stopped';
        state.reason = 'stopped by request';
      } else if (code === 0) {
        state.lifecycle = 'stopped';
        state.reason = 'guest shut down';
      } else {
        state.lifecycle = 'crashed';
        state.reason = `QEMU died (code ${code}, signal ${signal})`;
      }
      resolve();
    });
  });
  state.qemuPid = qemu.pid;
  state.qemuStartTime = procStartTime(qemu.pid);
  state.qemuSpawnedAt = performance.timeOrigin + spawnedAt;
  save();

  // From QEMU's first moment: a restore's QEMU must die too if the agent goes silent.
  // A shell guards nothing until a VM adopts it; then it guards that VM's files.
  let watchdog: WatchdogGuard | undefined;
  let cowGuard: { stop(): void } | undefined;
  let pauseGuard: { stop(): void } | undefined;
  let qmp: QmpClient | undefined;
  const guard = () => {
    watchdog = guardWithWatchdog(paths.watchdog, (reason) => {
      if (qemuExited) return;
      selfFenced = reason;
      qemu.kill('SIGKILL');
      state.selfFenced = reason;
      state.selfFencedAt = new Date().toISOString();
      logger.error({ reason }, 'watchdog starved: QEMU killed (self-fence)');
      save();
    });
    // A record left by a checkpointer of an earlier QEMU does not apply to this one.
    fs.rmSync(paths.cowGuard, { force: true });
    cowGuard = guardCowProtection(paths.cowGuard, () => (qemuExited ? undefined : qemu.pid), logger);
    fs.rmSync(paths.pauseGuard, { force: true });
    pauseGuard = guardCheckpointPause(paths.pauseGuard, async () => {
      if (!qmp || qmp.closed || qemuExited) throw new VmError('HYDRA_VM_QMP_UNAVAILABLE', `VM ${name}: QEMU's monitor is not connected`);
      await qmp.execute('cont', undefined, { timeoutMs: 2000 });
    }, logger);
  };
  if (!idleShell) guard();

  try {
    qmp = await connectWhenReady(paths.supervisorQmpSocket, { label: `VM ${name}`, deadlineMs: 15_000, isAlive: () => !qemuExited });
    const status = await qmp.execute<{ status: string }>('query-status');
    logger.info({ status: status.status, qemuPid: qemu.pid }, 'QEMU is up');
    state.lifecycle = 'running';
    save();
  } catch (err) {
    if (!qemuExited) {
      state.lifecycle = 'failed';
      state.reason = `QEMU did not become ready: ${(err as Error).message}`;
      save();
      qemu.kill('SIGKILL');
    }
  }

  /**
   * A VM adopts this idle shell: its runtime files move into the VM's directory (the
   * sockets keep their listeners across a rename), the serial console is re-pointed at
   * the VM's log, and from then on this supervisor is the VM's, guards included.
   * The caller has written the VM's spec.json there and holds the VM's start lock.
   */
  const adopt = async (vm: string): Promise<VmState> => {
    if (!idleShell || qemuExited || stopping || state.lifecycle !== 'running' || !qmp) {
      throw new VmError('HYDRA_VM_SHELL_BUSY', `restore shell ${shellId} cannot be adopted by VM "${vm}": it is ${qemuExited ? 'dead' : idleShell ? state.lifecycle : 'already adopted'}`);
    }
    idleShell = false;
    const to = vmPaths(vm);
    const adopted = JSON.parse(fs.readFileSync(to.spec, 'utf8')) as LaunchFile;
    moveShellFiles(paths, to);
    const input = openSerialInput(to.serialIn);
    await qmp.execute('chardev-change', {
      id: SERIAL_CHARDEV,
      backend: { type: 'file', data: { out: to.serialLog, append: true, ...(input !== undefined ? { in: to.serialIn } : {}) } },
    });
    if (serialIn !== undefined) fs.closeSync(serialIn);
    serialIn = input;
    const from = paths.dir;
    name = vm;
    paths = to;
    spec = adopted.spec;
    logger = vmLog(vm).child({ shell: shellId });
    state = { ...state, name: vm, memoryBytes: spec.memoryBytes, startedAt: new Date().toISOString(), shell: shellId, shellKey: undefined, ownerPid: undefined };
    save();
    guard();
    // What is left of the shell's directory (its old state and spec) describes nothing any more.
    fs.rmSync(from, { recursive: true, force: true });
    logger.info({ qemuPid: qemu.pid }, 'restore shell adopted');
    return state;
  };

  const stop = async () => {
    if (stopping || qemuExited) return;
    stopping = true;
    state.lifecycle = 'stopping';
    save();
    logger.info('stopping QEMU');
    qemu.kill('SIGTERM');
    const timer = setTimeout(() => qemu.kill('SIGKILL'), 5000);
    await exited;
    clearTimeout(timer);
  };
  // An idle shell whose owner died has nobody to hand it to, and must not outlive it.
  const ownerWatch = launchFile.shell ? setInterval(() => {
    if (idleShell && !pidAlive(launchFile.shell!.ownerPid)) {
      logger.info({ ownerPid: launchFile.shell!.ownerPid }, 'owner of the idle restore shell is gone: stopping it');
      void stop();
    }
  }, 500) : undefined;
  process.on('SIGTERM', () => void stop());
  process.on('SIGINT', () => void stop());

  const control = http.createServer((req, res) => {
    void (async () => {
      const reply = (code: number, body: unknown) => {
        res.writeHead(code, { 'content-type': 'application/json' });
        res.end(JSON.stringify(body));
      };
      if (req.method === 'GET' && req.url === '/status') {
        let run: string | undefined;
        try {
          run = qmp && !qmp.closed ? (await qmp.execute<{ status: string }>('query-status', undefined, { timeoutMs: 2000 })).status : undefined;
        } catch {
          run = undefined;
        }
        reply(200, { ...readStateAt(paths.state), runState: run });
      } else if (req.method === 'POST' && req.url?.startsWith('/adopt/')) {
        try {
          reply(200, await adopt(decodeURIComponent(req.url.slice('/adopt/'.length))));
        } catch (err) {
          reply(409, { error: (err as Error).message, code: (err as { code?: string }).code });
        }
      } else if (req.method === 'POST' && req.url === '/stop') {
        await stop();
        reply(200, { stopped: true });
      } else {
        reply(404, { error: `no route ${req.method} ${req.url}` });
      }
    })();
  });
  if (!qemuExited) {
    await new Promise<void>((resolve) => control.listen(paths.controlSocket, resolve));
  }

  await exited;
  watchdog?.stop();
  cowGuard?.stop();
  pauseGuard?.stop();
  if (ownerWatch) clearInterval(ownerWatch);
  if (serialIn !== undefined) fs.closeSync(serialIn);
  qmp?.close();
  control.close();
  control.closeAllConnections();
  if (idleShell) {
    // A shell that never served a VM leaves nothing behind but its final state (read by its pool).
    for (const f of [paths.qmpSocket, paths.supervisorQmpSocket, paths.hydraQmpSocket, paths.controlSocket]) fs.rmSync(f, { force: true });
    save();
    logger.info({ lifecycle: state.lifecycle, reason: state.reason }, 'restore shell ended');
    fs.closeSync(qemuErr);
    return;
  }
  removeStaleSockets(name);
  // Before the final state: whoever sees the VM ended may create the same taps at once (a restore).
  await releaseNics(spec).catch((err: unknown) => logger.warn({ err }, 'removing the VM\'s taps failed'));
  save();
  logger.info({ lifecycle: state.lifecycle, reason: state.reason }, 'VM ended');
  fs.closeSync(qemuErr);
}

/**
 * The serial console's input: a FIFO held open read-write here, so QEMU's
 * read-only open of it returns at once and never sees end-of-file while the
 * VM lives. Whoever writes a line to it types on the guest's console.
 * Undefined (no input) when the FIFO cannot be made.
 */
function openSerialInput(file: string): number | undefined {
  fs.rmSync(file, { force: true });
  const r = spawnSync('mkfifo', ['-m', '600', file], { stdio: 'ignore' });
  if (r.status !== 0) return undefined;
  try {
    return fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_NONBLOCK);
  } catch {
    return undefined;
  }
}
