import { test } from 'node:test';
import assert from 'node:assert/strict';
import { assertFreeSpace, debianBuildNeeds } from './space.js';
import { hostDebianSources } from './sources.js';
import { buildDebianImage } from './debian.js';

const GiB = 1024 ** 3;

test('a build without enough free space is refused before it starts, naming the directory and both numbers', () => {
  assert.throws(() => assertFreeSpace('/srv/cache/images', 3 * GiB, 'building the Debian image (redis-server)', 1.2 * GiB), (err: Error & { code?: string }) => {
    assert.equal(err.code, 'HYDRA_IMAGE_NO_SPACE');
    assert.match(err.message, /building the Debian image \(redis-server\): needs about 3\.0 GiB free in \/srv\/cache\/images, only 1\.2 GiB are/);
    return true;
  });
  assertFreeSpace('/srv/cache/images', GiB, 'x', 2 * GiB);
  assertFreeSpace('/', 1, 'x'); // the real filesystem has a byte free
  assert.ok(debianBuildNeeds(['redis-server', 'gcc', 'ffmpeg']) > debianBuildNeeds(['redis-server']));
});

test('the guest comes from this host\'s Debian mirror only: its release, -updates and -security, main', () => {
  const s = hostDebianSources();
  assert.match(s.suite, /^[a-z]+$/);
  assert.ok(s.uris.length > 0);
  for (const uri of s.uris) assert.match(uri, /\/debian(-security)?\/?$/);
  assert.doesNotMatch(s.text, /backports/);
  assert.doesNotMatch(s.text, /deb-src/);
  // The workload image also reads the same archives' sources (for the compile job's C code).
  const src = hostDebianSources({ withSource: true });
  assert.equal(src.text.replace(/Types: deb deb-src/g, 'Types: deb'), s.text);
  assert.match(src.text, /^Types: deb deb-src$/m);
  for (const line of s.text.split('\n').filter((l) => l.startsWith('Suites:'))) {
    for (const suite of line.slice(7).trim().split(/\s+/)) assert.ok([s.suite, `${s.suite}-updates`, `${s.suite}-security`].includes(suite), suite);
  }
});

test('bad build arguments are refused before anything is downloaded', async () => {
  const bad = async (opts: Parameters<typeof buildDebianImage>[0], re: RegExp) =>
    assert.rejects(buildDebianImage(opts), (err: Error & { code?: string }) => {
      assert.equal(err.code, 'HYDRA_IMAGE_BAD_ARGS');
      assert.match(err.message, re);
      return true;
    });
  await bad({ size: '512M' }, /--size 512M: a Debian root disk needs at least 1G/);
  await bad({ size: 'big' }, /--size: "big" is not a size/);
  await bad({ packages: ['redis-server', 'Bad Name'] }, /--packages: "Bad Name" is not a Debian package name/);
  await bad({ name: '../x' }, /image name "\.\.\/x" is not valid/);
  await bad({ workloads: true, packages: ['ffmpeg', 'no_such!'] }, /--packages: "no_such!" is not a Debian package name/);
});
