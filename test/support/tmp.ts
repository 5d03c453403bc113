// Temporary directories for tests: short paths under /tmp (unix socket paths are limited to 108 bytes), removed when the test process exits.
import fs from 'node:fs';
import path from 'node:path';

const created: string[] = [];
process.on('exit', () => {
  for (const d of created) {
    try {
      fs.rmSync(d, { recursive: true, force: true });
    } catch {
      // a still-mounted tmpfs: the test's own cleanup reports it
    }
  }
});

/** A fresh directory /tmp/hv-PREFIX-XXXXXX. */
export function tmpDir(prefix = 'test'): string {
  const d = fs.mkdtempSync(path.join('/tmp', `hv-${prefix.replace(/-+$/, '')}-`));
  created.push(d);
  return d;
}
