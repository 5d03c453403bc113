// What the evaluation ran on: machine, QEMU, accelerator, git commit, load.
import fs from 'node:fs';
import os from 'node:os';
import { execFileSync } from 'node:child_process';
import { findQemu, chooseAccel } from '../../vm/index.js';
import { packageRoot } from '../../config/paths.js';
import type { Environment, LoadSample } from './types.js';

function run(cmd: string, args: string[], cwd?: string): string {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', cwd, stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch {
    // Missing tool or not a git checkout: the field says "unknown" rather than failing the run.
    return '';
  }
}

function cpuModel(): string {
  try {
    const m = /^model name\s*:\s*(.+)$/m.exec(fs.readFileSync('/proc/cpuinfo', 'utf8'));
    if (m) return m[1]!.trim();
  } catch {
    // Not Linux /proc: fall back to what Node reports.
  }
  return os.cpus()[0]?.model ?? 'unknown';
}

export function environment(): Environment {
  const qemu = findQemu();
  return {
    machine: { cpuModel: cpuModel(), cores: os.cpus().length, memGiB: Math.round((os.totalmem() / 2 ** 30) * 10) / 10, kernel: os.release() },
    qemu: { binary: qemu, version: run(qemu, ['--version']).split('\n')[0] ?? 'unknown' },
    accel: chooseAccel('auto', 'bench-eval'),
    git: {
      commit: run('git', ['rev-parse', 'HEAD'], packageRoot) || 'unknown',
      dirty: run('git', ['status', '--porcelain', '--untracked-files=no'], packageRoot) !== '',
      branch: run('git', ['rev-parse', '--abbrev-ref', 'HEAD'], packageRoot) || 'unknown',
    },
    node: process.version,
  };
}

export function loadSample(): LoadSample {
  return { at: new Date().toISOString(), loadavg: os.loadavg().map((v) => Math.round(v * 100) / 100) };
}
