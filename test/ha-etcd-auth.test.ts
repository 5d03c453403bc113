import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { cliEntry } from '../src/config/paths.js';
import { Cluster } from '../src/ha/cluster.js';
import { etcdLab, inProcessAgent, until } from './support/ha.js';

/**
 * A real etcd with a user and auth enabled: agents, managers and the CLI
 * reach it with --etcd-user/--etcd-password (or HYDRAVM_ETCD_USER/PASSWORD),
 * and are refused without them.
 */
/** The CLI, asynchronously: a blocking spawn would starve the in-process agent's 1 s lease. */
function cli(args: string[], env: NodeJS.ProcessEnv): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [cliEntry, ...args], { env });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('close', (status) => resolve({ status, stdout, stderr }));
  });
}

test('etcd with auth enabled: the agent and the CLI authenticate; without credentials they are refused', { timeout: 60_000 }, async () => {
  const lab = await etcdLab('auth');
  try {
    const ctl = (...args: string[]) => execFileSync('etcdctl', ['--endpoints', lab.etcd.url, ...args], { encoding: 'utf8' });
    ctl('user', 'add', 'root', '--new-user-password=root-pw-123', '--interactive=false');
    ctl('user', 'grant-role', 'root', 'root');
    ctl('user', 'add', 'hydra', '--new-user-password=hydra-pw-123', '--interactive=false');
    ctl('role', 'add', 'hydravm');
    ctl('role', 'grant-permission', 'hydravm', '--prefix=true', 'readwrite', '/hydravm/');
    ctl('user', 'grant-role', 'hydra', 'hydravm');
    ctl('auth', 'enable');

    const anonymous = new Cluster(lab.etcd.url);
    await assert.rejects(anonymous.hosts(), /user name is empty|permission denied|authentication|invalid auth token/i, 'an anonymous client is refused');
    anonymous.close();
    const wrong = new Cluster(lab.etcd.url, { credentials: { user: 'hydra', password: 'wrong' } });
    await assert.rejects(wrong.hosts(), /authentication failed|invalid user ID or password/i, 'a wrong password is refused');
    wrong.close();

    const credentials = { user: 'hydra', password: 'hydra-pw-123' };
    const agent = await inProcessAgent(lab, 'h1', { etcdOptions: { credentials } });
    const authed = new Cluster(lab.etcd.url, { credentials });
    try {
      await until('h1 registered through auth', async () => (await authed.hosts()).get('h1'), 15_000);
      const env = { ...process.env, HYDRAVM_LOG_LEVEL: 'silent' };
      const ok = await cli(['cluster', 'status', '--json', '--etcd', lab.etcd.url, '--etcd-user', 'hydra'], { ...env, HYDRAVM_ETCD_PASSWORD: 'hydra-pw-123' });
      assert.equal(ok.status, 0, ok.stderr);
      assert.ok(JSON.parse(ok.stdout).hosts.some((h: { name: string; alive: boolean }) => h.name === 'h1' && h.alive), ok.stdout);
      const refused = await cli(['cluster', 'status', '--json', '--etcd', lab.etcd.url], env);
      assert.notEqual(refused.status, 0, 'the CLI without credentials is refused');
      const half = await cli(['cluster', 'status', '--etcd', lab.etcd.url, '--etcd-user', 'hydra'], env);
      assert.match(half.stderr, /needs both a user and a password/);
      await agent.stop();
    } finally {
      authed.close();
    }
  } finally {
    await lab.cleanup();
  }
});
