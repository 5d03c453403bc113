// Test-only fault injection at each step of a checkpoint (HYDRAVM_CKPT_FAULT); never set in production.
/**
 * `HYDRAVM_CKPT_FAULT=<step>@<n>,...` makes the first checkpoint attempt of the
 * checkpointer process from the n-th on (counting from 1, failed attempts
 * included, the full checkpoint's closing pause included) that reaches <step>
 * fail there, once (an attempt without overflow pages never reaches `overflow`). Steps, in checkpoint order:
 *
 *   collect   after the dirty runs were collected (and re-protected), in the pause
 *   copy      after they were copied into the staging buffer, in the pause
 *   devstate  as if xen-save-devices-state had failed, in the pause
 *   freeze    as if freezing the disk layers had failed, in the pause
 *   overflow  the store connection drops while pages beyond the staging buffer are sent: in a
 *             pre-copy round before the pause, or the pause's overflow after `cont`
 *   send      the store connection drops while staged pages are sent after `cont`
 *   commit    just before COMMIT is sent
 *   ack       after COMMITTED arrived, before it is recorded (an acknowledgement lost)
 *
 * A fault either throws HYDRA_CKPT_INJECTED (retried like a store failure) or,
 * for overflow/send, closes the store connection so the next send fails as a
 * real drop would. The tests use it to prove that no failure loses a dirty page.
 */
import type { Logger } from 'pino';
import { CheckpointError } from '../errors.js';

export const CKPT_FAULT_STEPS = ['collect', 'copy', 'devstate', 'freeze', 'overflow', 'send', 'commit', 'ack'] as const;
export type CkptFaultStep = (typeof CKPT_FAULT_STEPS)[number];

export class CheckpointFaults {
  private readonly at = new Map<CkptFaultStep, number>();
  private readonly fired = new Set<CkptFaultStep>();
  private attempt = 0;

  constructor(spec: string | undefined) {
    for (const part of (spec ?? '').split(',').map((s) => s.trim()).filter(Boolean)) {
      const m = /^([a-z]+)@(\d+)$/.exec(part);
      if (!m || !(CKPT_FAULT_STEPS as readonly string[]).includes(m[1]!)) {
        throw new CheckpointError('HYDRA_CKPT_BAD_FAULT', `bad HYDRAVM_CKPT_FAULT entry "${part}": expected <step>@<n> with step one of ${CKPT_FAULT_STEPS.join(', ')}`);
      }
      this.at.set(m[1] as CkptFaultStep, Number(m[2]));
    }
  }

  get enabled(): boolean {
    return this.at.size > 0;
  }

  /** A checkpoint attempt starts; returns its number. */
  nextAttempt(): number {
    return ++this.attempt;
  }

  /** True when `step` must fail now; it then counts as fired. */
  private take(step: CkptFaultStep): boolean {
    const n = this.at.get(step);
    if (n === undefined || this.attempt < n || this.fired.has(step)) return false;
    this.fired.add(step);
    return true;
  }

  /** Throw the injected failure when `step` is due. */
  hit(step: CkptFaultStep): void {
    if (this.take(step)) throw new CheckpointError('HYDRA_CKPT_INJECTED', `injected fault at checkpoint step "${step}" (attempt ${this.attempt}, HYDRAVM_CKPT_FAULT)`);
  }

  /** True when the store connection must be dropped at `step` now; logs it. */
  drop(step: CkptFaultStep, log: Logger): boolean {
    if (!this.take(step)) return false;
    log.warn({ step, attempt: this.attempt }, `injected fault at checkpoint step "${step}": dropping the store connection`);
    return true;
  }
}
