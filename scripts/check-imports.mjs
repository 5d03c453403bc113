#!/usr/bin/env node
// The import check run by `npm test`: imports in src/ go downward only, enter another folder through its index.ts, and form no cycle.
import fs from 'node:fs';
import path from 'node:path';

/**
 * Layers, highest first. A folder may import its own files, folders of a
 * lower layer, and folders of its own layer (no cycle allowed). `config`,
 * `util` and errors.ts are shared helpers without a front door; every other
 * folder is entered through its index.ts. Tests (*.test.ts) are not checked.
 */
const LAYERS = [
  ['cli'],
  ['demo', 'bench'],
  ['ha'],
  ['restore', 'checkpoint', 'image'],
  ['store', 'protocol', 'disk', 'tracker', 'vm', 'setup'],
  ['qmp', 'native', 'net'],
  ['config', 'util', 'errors.ts'],
];
const NO_FRONT_DOOR = new Set(['config', 'util', 'errors.ts']);
/**
 * Folders only some may import: the native addon is the kernel's door, held by the userfaultfd layer,
 * by vm, which owns the VM's processes (pidfd kills), and by the store for one call (flock(2) on its
 * directory's lock file, which Node does not offer).
 */
const ONLY_FROM = new Map([['native', new Set(['tracker', 'vm', 'store'])]]);

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const src = path.join(root, 'src');
const rank = new Map(LAYERS.flatMap((names, i) => names.map((n) => [n, LAYERS.length - i])));

function listTs(dir) {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((d) => {
    const p = path.join(dir, d.name);
    if (d.isDirectory()) return listTs(p);
    return d.name.endsWith('.ts') && !d.name.endsWith('.test.ts') && !d.name.endsWith('.d.ts') ? [p] : [];
  });
}

/** The top-level part of src/ a file belongs to: its folder, or the file itself at the top. */
function part(file) {
  const rel = path.relative(src, file).split(path.sep);
  return rel.length === 1 ? rel[0] : rel[0];
}

const IMPORT = /(?:^|\n)\s*(import|export)\s+(type\s+)?(?:[^'";]*?\s+from\s+)?['"]([^'"]+)['"]|import\(\s*['"]([^'"]+)['"]\s*\)/g;

function importsOf(file) {
  const text = fs.readFileSync(file, 'utf8');
  const out = [];
  for (const m of text.matchAll(IMPORT)) {
    const spec = m[3] ?? m[4];
    if (!spec.startsWith('.')) continue;
    const target = path.resolve(path.dirname(file), spec.replace(/\.js$/, '.ts'));
    out.push({ target, typeOnly: !!m[2] });
  }
  return out;
}

const files = listTs(src);
const problems = [];
const graph = new Map();
const folderGraph = new Map();
for (const file of files) {
  const from = part(file);
  if (!rank.has(from)) problems.push(`${path.relative(root, file)}: folder "${from}" has no layer in scripts/check-imports.mjs`);
  const edges = [];
  for (const { target, typeOnly } of importsOf(file)) {
    const rel = path.relative(root, file);
    if (!fs.existsSync(target)) { problems.push(`${rel}: imports ${path.relative(root, target)}, which does not exist`); continue; }
    const to = part(target);
    if (!typeOnly) edges.push(target);
    if (to === from) continue;
    if (!folderGraph.has(from)) folderGraph.set(from, new Set());
    folderGraph.get(from).add(to);
    if ((rank.get(to) ?? 0) > (rank.get(from) ?? 0)) problems.push(`${rel}: imports ${path.relative(root, target)} upward (${from} sits below ${to})`);
    if (ONLY_FROM.has(to) && !ONLY_FROM.get(to).has(from)) problems.push(`${rel}: imports ${path.relative(root, target)}; only ${[...ONLY_FROM.get(to)].join(', ')} may use ${to}/`);
    if (!NO_FRONT_DOOR.has(to) && path.basename(target) !== 'index.ts') problems.push(`${rel}: imports ${path.relative(root, target)}, an internal file of ${to}/ (use ${to}/index.ts)`);
  }
  graph.set(file, edges);
}

/** Report each cycle once, as the chain of its members. */
function cycles(g, name) {
  const state = new Map();
  const stack = [];
  const found = [];
  const visit = (n) => {
    state.set(n, 'open');
    stack.push(n);
    for (const m of g.get(n) ?? []) {
      if (state.get(m) === 'open') found.push([...stack.slice(stack.indexOf(m)), m].map(name).join(' -> '));
      else if (!state.has(m)) visit(m);
    }
    stack.pop();
    state.set(n, 'done');
  };
  for (const n of g.keys()) if (!state.has(n)) visit(n);
  return found;
}
for (const c of cycles(graph, (f) => path.relative(root, f))) problems.push(`import cycle: ${c}`);
for (const c of cycles(folderGraph, (f) => f)) problems.push(`folder cycle: ${c}`);

if (problems.length) {
  process.stderr.write(`import check: ${problems.length} problem(s)\n${problems.map((p) => `  ${p}`).join('\n')}\n`);
  process.exit(1);
}
process.stdout.write(`import check: ${files.length} files, imports go downward, through index.ts, without cycles\n`);
