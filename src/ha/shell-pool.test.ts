import { test } from 'node:test';
import assert from 'node:assert/strict';
import pino from 'pino';
import { ShellPool } from './shell-pool.js';
import { shellKey, type ShellConfig } from '../vm/index.js';
import type { VmRecord } from './cluster.js';

const config = (memoryBytes: number): ShellConfig => ({ memoryBytes, vcpus: 1, accel: 'tcg', kernel: '/k', diskSizes: [] });
const record = (name: string, host: string, state: VmRecord['state'], c: ShellConfig): VmRecord => ({ name, host, generation: 1, store: 'cluster', mode: 'network', intervalMs: 1000, state, shellConfig: c, updatedAt: 0 });

test('a host keeps shells for the VMs it may receive, and for a VM being restored onto it until the restore adopted one', () => {
  const pool = new ShellPool(pino({ level: 'silent' }), 'h1');
  const a = config(256 << 20);
  const b = config(512 << 20);
  const c = config(1024 << 20);
  const keys = (records: VmRecord[]) => pool.wanted(records, 'h1').map(shellKey);
  // Runs elsewhere: may come here.
  assert.deepEqual(keys([record('x', 'h2', 'protected', a)]), [shellKey(a)]);
  // Runs here, or is given up: no shell.
  assert.deepEqual(keys([record('x', 'h1', 'protected', a), record('y', 'h1', 'running', b), record('z', 'h2', 'lost', c)]), []);
  // Being restored here: its shell is about to be adopted and must not be stopped as unwanted meanwhile.
  assert.deepEqual(keys([record('x', 'h1', 'restoring', a)]), [shellKey(a)]);
  // Most wanted first.
  assert.deepEqual(keys([record('x', 'h2', 'protected', b), record('y', 'h3', 'protected', a), record('z', 'h2', 'crashed', a)]), [shellKey(a), shellKey(b)]);
});
