// The --cow / --grain options of `protect` and `cluster protect`.
import { parseGrain } from '../vm/index.js';
import { SpecError } from '../errors.js';

/** { cow: { grain? } } when --cow was given; {} otherwise (the VM's spec decides). */
export function cowOption(opts: { cow?: boolean; grain?: string }): { cow?: { grain?: number } } {
  if (opts.grain !== undefined && !opts.cow) throw new SpecError('--grain applies to copy-on-write checkpoints: add --cow');
  if (!opts.cow) return {};
  return { cow: opts.grain === undefined ? {} : { grain: parseGrain(opts.grain, '--grain') } };
}
