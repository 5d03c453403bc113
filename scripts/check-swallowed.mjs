#!/usr/bin/env node
// The swallowed-error check run by `npm test`: every `.catch(() => undefined)` (or null, [], ...) in src/ says why, in a comment just above or beside it.
import fs from 'node:fs';
import path from 'node:path';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const src = path.join(root, 'src');
const SWALLOW = /\.catch\(\(\)\s*=>\s*(undefined|null|\{\s*\}|false|\[\]|new Map\(\)|void 0)\)/;

function listTs(dir) {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((d) => {
    const p = path.join(dir, d.name);
    if (d.isDirectory()) return listTs(p);
    return d.name.endsWith('.ts') && !d.name.endsWith('.test.ts') ? [p] : [];
  });
}

const problems = [];
for (const file of listTs(src)) {
  const lines = fs.readFileSync(file, 'utf8').split('\n');
  lines.forEach((line, i) => {
    const m = SWALLOW.exec(line);
    if (!m || line.slice(m.index).includes('//')) return;
    // A comment on the lines just above the statement (walking back over its continuation lines).
    for (let j = i - 1; j >= Math.max(0, i - 6); j--) {
      const t = lines[j].trim();
      if (t.startsWith('//') || t.startsWith('*')) return;
      if (t.endsWith(';') && !SWALLOW.test(t)) break;
    }
    problems.push(`${path.relative(root, file)}:${i + 1}: ${line.trim()}`);
  });
}
if (problems.length) {
  process.stderr.write(`swallowed errors without a word on why (comment it, or log it):\n${problems.map((p) => `  ${p}`).join('\n')}\n`);
  process.exit(1);
}
process.stdout.write('swallowed-error check: every swallowed error says why\n');
