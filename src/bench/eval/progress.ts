// The progress display of a long evaluation run: which part, which sample, elapsed, and an estimate of what is left.

export interface PlannedPart {
  id: string;
  samples: number;
  /** Rough seconds per unit of weight before any sample is measured (then replaced by the measured rate). */
  estimateS: number;
  /** Relative cost of each sample (a 4 GB VM takes longer than a 0.5 GB one); default 1 each. */
  weights?: number[];
}

const fmtS = (s: number) => (s >= 3600 ? `${Math.floor(s / 3600)}h${String(Math.round((s % 3600) / 60)).padStart(2, '0')}m` : s >= 60 ? `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, '0')}s` : `${Math.round(s)}s`);

/**
 * Lines on stderr, one per event, plus a heartbeat every 20 s while a sample
 * runs (a 4 GB guest fills its memory for minutes under TCG). The ETA of a
 * part is the weight of its remaining samples times the seconds per unit of
 * weight measured so far; parts not yet started count with their estimate.
 */
export class Progress {
  private readonly t0 = performance.now();
  private readonly done = new Map<string, { n: number; seconds: number; weight: number }>();
  private part = '';
  private sampleLabel = '';
  private sampleIdx = 0;
  private sampleStart = 0;
  private readonly heartbeat: NodeJS.Timeout;

  constructor(private readonly plan: PlannedPart[], private readonly write: (line: string) => void) {
    this.heartbeat = setInterval(() => {
      if (this.part) this.emit(`${this.sampleLabel || this.part} running for ${fmtS((performance.now() - this.sampleStart) / 1000)}`);
    }, 20_000);
    this.heartbeat.unref();
  }

  private planned(id: string) {
    return this.plan.find((p) => p.id === id) ?? { id, samples: 1, estimateS: 60, weights: undefined };
  }

  /** Seconds left in the run: this part's remaining samples plus later parts. */
  eta(): number {
    let left = 0;
    for (const p of this.plan) {
      const d = this.done.get(p.id);
      const w = (i: number) => p.weights?.[i] ?? 1;
      const weightFrom = (i: number) => Array.from({ length: Math.max(0, p.samples - i) }, (_, k) => w(i + k)).reduce((a, b) => a + b, 0);
      if (p.id === this.part) {
        const n = d?.n ?? 0;
        const perWeight = d && d.weight ? d.seconds / d.weight : p.estimateS;
        const inSample = this.sampleIdx > n ? Math.min(perWeight * w(n), (performance.now() - this.sampleStart) / 1000) : 0;
        left += weightFrom(n) * perWeight - inSample;
      } else if (!d) {
        left += weightFrom(0) * p.estimateS;
      }
    }
    return Math.max(0, left);
  }

  private emit(msg: string): void {
    const p = this.planned(this.part);
    const partNo = this.plan.findIndex((x) => x.id === this.part) + 1;
    this.write(`[eval ${fmtS((performance.now() - this.t0) / 1000)} | part ${partNo}/${this.plan.length} ${this.part} | sample ${this.sampleIdx}/${p.samples} | ETA ${fmtS(this.eta())}] ${msg}`);
  }

  startPart(id: string): void {
    this.part = id;
    this.sampleIdx = 0;
    this.sampleLabel = '';
    this.sampleStart = performance.now();
    this.done.set(id, { n: 0, seconds: 0, weight: 0 });
    this.emit('start');
  }

  startSample(label: string): void {
    this.sampleIdx++;
    this.sampleLabel = label;
    this.sampleStart = performance.now();
    this.emit(label);
  }

  endSample(result: string): void {
    const d = this.done.get(this.part)!;
    d.weight += this.planned(this.part).weights?.[d.n] ?? 1;
    d.n++;
    d.seconds += (performance.now() - this.sampleStart) / 1000;
    this.emit(`${this.sampleLabel}: ${result}`);
    this.sampleLabel = '';
    this.sampleStart = performance.now();
  }

  log(msg: string): void {
    this.emit(msg);
  }

  endPart(status: string): void {
    this.emit(`end: ${status}`);
    this.part = '';
  }

  close(): void {
    clearInterval(this.heartbeat);
  }
}
