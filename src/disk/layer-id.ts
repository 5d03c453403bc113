import { DiskError } from '../errors.js';

/**
 * What the store keeps for each disk of a committed epoch (StoreMeta.disks):
 * one string per disk, a small JSON object
 *
 *   {"v":1,"disk":0,"epoch":12,"layer":"/shared/layers/web/d0-3fa2c1-12.qcow2"}
 *
 * `layer` is the absolute path of the frozen qcow2 layer: its header names its
 * backing file, so the chain down to the original disk is found from the file
 * alone. The short form `disk0=/path/layer.qcow2` is accepted too (tests, hand edits).
 */
export interface LayerRef {
  disk: number;
  epoch: number | null;
  layer: string;
}

export function encodeLayerId(ref: LayerRef): string {
  return JSON.stringify({ v: 1, disk: ref.disk, epoch: ref.epoch, layer: ref.layer });
}

export function parseLayerId(id: string): LayerRef {
  const bad = (why: string) => new DiskError('HYDRA_DISK_LAYER_ID_INVALID', `disk layer id ${JSON.stringify(id.slice(0, 200))} is invalid: ${why}`);
  const short = /^disk(\d+)=(\/.+)$/.exec(id);
  if (short) return { disk: Number(short[1]), epoch: null, layer: short[2]! };
  let raw: unknown;
  try {
    raw = JSON.parse(id);
  } catch {
    throw bad('neither JSON nor diskN=/path');
  }
  const o = raw as Record<string, unknown>;
  if (!o || typeof o !== 'object') throw bad('not an object');
  if (o.v !== 1) throw bad(`unknown version ${String(o.v)}`);
  if (typeof o.disk !== 'number' || !Number.isInteger(o.disk) || o.disk < 0) throw bad('"disk" must be a disk index');
  if (typeof o.layer !== 'string' || !o.layer.startsWith('/')) throw bad('"layer" must be an absolute path');
  const epoch = typeof o.epoch === 'number' ? o.epoch : null;
  return { disk: o.disk, epoch, layer: o.layer };
}
