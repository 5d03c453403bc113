// Walks every error of the catalogue: name, code and message of each, and its line in docs/errors.md.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import {
  BenchError, ImageError, NetError, RedisClientError, CheckpointError, ConfigError, DiskError, ERROR_CODES, HaError, HydraError, IoError, NativeError, NetnsError, ProtocolError, QemuError, QmpClosedError,
  QmpError, QmpTimeoutError, RestoreError, SetupError, SpecError, StoreError, TrackerError, VmError, errorFromCode, familyOf, ioStepError,
  isHydraCode, type ErrorFamily, type HydraCode,
} from './errors.js';

const docsFile = fileURLToPath(new URL('../../docs/errors.md', import.meta.url));

/** The class each family's errors are built as (the QMP family: one class per code). */
const CLASS_OF: Record<ErrorFamily, (code: HydraCode) => abstract new (...a: never[]) => HydraError> = {
  config: () => ConfigError,
  spec: () => SpecError,
  vm: () => VmError,
  qemu: () => QemuError,
  qmp: (code) => (code === 'HYDRA_QMP_TIMEOUT' ? QmpTimeoutError : code === 'HYDRA_QMP_CLOSED' ? QmpClosedError : QmpError),
  setup: () => SetupError,
  native: () => NativeError,
  tracker: () => TrackerError,
  io: () => IoError,
  store: () => StoreError,
  protocol: () => ProtocolError,
  checkpoint: () => CheckpointError,
  restore: () => RestoreError,
  disk: () => DiskError,
  ha: () => HaError,
  netns: () => NetnsError,
  bench: () => BenchError,
  net: () => NetError,
  image: () => ImageError,
  redis: () => RedisClientError,
};

const allCodes = (Object.keys(ERROR_CODES) as ErrorFamily[]).flatMap((f) => ERROR_CODES[f].map((code) => ({ family: f, code: code as HydraCode })));

test('every code is a HYDRA_ literal and belongs to exactly one family', () => {
  const seen = new Set<string>();
  for (const { code } of allCodes) {
    assert.match(code, /^HYDRA_[A-Z0-9_]+$/);
    assert.ok(!seen.has(code), `${code} is listed twice`);
    seen.add(code);
  }
  assert.ok(seen.size > 100);
});

test('every error of the catalogue: class, name, code, message, cause', () => {
  for (const { family, code } of allCodes) {
    const cause = new Error('lower level');
    const e = errorFromCode(code, `something about ${code}`, { cause });
    const cls = CLASS_OF[family](code);
    assert.ok(e instanceof HydraError && e instanceof Error, code);
    assert.ok(e instanceof cls, `${code} is built as ${cls.name}, got ${e.constructor.name}`);
    assert.equal(e.name, cls.name, code);
    assert.equal(e.code, code);
    assert.equal(e.message, `something about ${code}`);
    if (code !== 'HYDRA_QMP_TIMEOUT') assert.equal(e.cause, cause, `${code} keeps its cause`);
    assert.equal(familyOf(code), family);
    assert.ok(isHydraCode(code));
  }
});

test('a code the catalogue does not know becomes HYDRA_STORE_INTERNAL naming it', () => {
  const e = errorFromCode('HYDRA_FROM_THE_FUTURE', 'new peer');
  assert.ok(e instanceof StoreError);
  assert.equal(e.code, 'HYDRA_STORE_INTERNAL');
  assert.match(e.message, /HYDRA_FROM_THE_FUTURE: new peer/);
  assert.ok(!isHydraCode('HYDRA_FROM_THE_FUTURE'));
});

test('ioStepError names the step and maps errno to a code', () => {
  const e = ioStepError('fsync', '/x/meta.json', Object.assign(new Error('no space left'), { code: 'ENOSPC' }));
  assert.equal(e.code, 'HYDRA_IO_NO_SPACE');
  assert.equal(e.message, 'fsync /x/meta.json: no space left');
  assert.equal(ioStepError('open', 'f', { code: 'EROFS', message: 'ro' }).code, 'HYDRA_IO_READ_ONLY');
  assert.equal(ioStepError('open', 'f', { code: 'EIO', message: 'io' }).code, 'HYDRA_IO_FAILED');
});

test('docs/errors.md has exactly one line per code, each saying what happened and what to do', () => {
  const rows = fs.readFileSync(docsFile, 'utf8').split('\n').filter((l) => l.startsWith('| `HYDRA_'));
  const documented = new Map<string, number>();
  for (const row of rows) {
    const cells = row.split('|').slice(1, -1).map((c) => c.trim());
    const code = cells[0]!.replace(/`/g, '');
    assert.equal(cells.length, 3, `${code}: a row has the code, what happened, what you do`);
    assert.ok(cells[1]!.length > 10 && cells[2]!.length > 3, `${code}: both explanations are filled in`);
    documented.set(code, (documented.get(code) ?? 0) + 1);
  }
  for (const { code } of allCodes) assert.equal(documented.get(code), 1, `${code} is documented once in docs/errors.md`);
  for (const code of documented.keys()) assert.ok(isHydraCode(code), `docs/errors.md documents ${code}, which src/errors.ts does not have`);
});

test('every HYDRA_ code literal in src/ is in the catalogue', () => {
  const srcDir = fileURLToPath(new URL('../../src/', import.meta.url));
  const unknown: string[] = [];
  for (const file of fs.readdirSync(srcDir, { recursive: true }) as string[]) {
    if (!file.endsWith('.ts') || file.endsWith('.test.ts')) continue;
    const text = fs.readFileSync(srcDir + file, 'utf8');
    for (const m of text.matchAll(/'(HYDRA_[A-Z0-9_]+)'/g)) if (!isHydraCode(m[1])) unknown.push(`${file}: ${m[1]}`);
  }
  assert.deepEqual(unknown, []);
});
