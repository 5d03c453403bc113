import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { writeFileAtomic } from '../util/atomic-write.js';

/**
 * Pins: a restore that runs while the primary still merges (a restore drill,
 * or a restore racing a not-yet-fenced primary) must not see the base change
 * under it. A pin is a small file in the VM's layer directory,
 *   <layerDir>/<vm>/pins/<name>.json  {"layers": ["/abs/frozen.qcow2", ...], "overlays": [...], "createdAt": "..."}
 * The freezer never merges a pinned layer or anything above it, so every
 * pinned chain stays byte-identical (merging below a pinned layer is safe: the
 * data copied into the base is shadowed by the pinned layer's own chain).
 */
export const PIN_ALL = '*';

export function pinsDir(vmLayerDir: string): string {
  return path.join(vmLayerDir, 'pins');
}

function pinName(overlays: string[]): string {
  return createHash('sha256').update(overlays.join('\n')).digest('hex').slice(0, 16) + '.json';
}

export async function writePin(vmLayerDir: string, layers: string[], overlays: string[]): Promise<string> {
  const dir = pinsDir(vmLayerDir);
  await fs.mkdir(dir, { recursive: true });
  const file = path.join(dir, pinName(overlays));
  await writeFileAtomic(file, JSON.stringify({ layers, overlays, createdAt: new Date().toISOString() }) + '\n');
  return file;
}

export async function removePin(vmLayerDir: string, overlays: string[]): Promise<void> {
  await fs.rm(path.join(pinsDir(vmLayerDir), pinName(overlays)), { force: true });
}

/** Every layer file pinned in this VM layer directory. An unreadable pin yields PIN_ALL (merging stops: safe side). */
export async function pinnedFiles(vmLayerDir: string): Promise<Set<string>> {
  const out = new Set<string>();
  let names: string[];
  try {
    names = await fs.readdir(pinsDir(vmLayerDir));
  } catch {
    return out;
  }
  for (const n of names) {
    if (!n.endsWith('.json')) continue;
    try {
      const o = JSON.parse(await fs.readFile(path.join(pinsDir(vmLayerDir), n), 'utf8')) as { layers?: unknown };
      if (Array.isArray(o.layers)) for (const l of o.layers) if (typeof l === 'string') out.add(l);
    } catch {
      out.add(PIN_ALL);
    }
  }
  return out;
}
