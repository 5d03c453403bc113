// The progress display of a long evaluation run: which part, which sample, elapsed, and an estimate of what is left.

export interface PlannedPart {
  id: string;
  samples: number;
  /** Rough seconds per sample before any is measured (replaced by the measured mean once one is). */
  estimateS: number;
}

const fmtS = (s: number) => (s >= 3600 ? `${Math.floor(s / 3600)}h${String(Math.round((s % 3600) / 60)).padStart(2, '0')}m` : s >= 60 ? `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, '0')}s` : `${Math.round(s)}s`);

/**
 * Lines on stderr, one per event, plus a heartbeat every 20 s while a sample
 * runs (a 4 GB guest fills its memory for minutes under TCG). The ETA of a
 * part is its remaining samples times its measured mean per sample; parts not
 * yet started count with their estimate.
 */
export class Progress {
  private readonly t0 = performance.now();
  private readonly done = new Map<string, { n: number; seconds: number }>();
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
    return this.plan.find((p) => p.id === id) ?? { id, samples: 1, estimateS: 60 };
  }

  /** Seconds left in the run: this part's remaining samples plus later parts. */
  eta(): number {
    let left = 0;
    for (const p of this.plan) {
      const d = this.done.get(p.id);
      if (p.id === this.part) {
        const perSample = d && d.n ? d.seconds / d.n : p.estimateS;
        const inSample = Math.min(perSample, (performance.now() - this.sampleStart) / 1000);
        left += Math.max(0, p.samples - (d?.n ?? 0)) * perSample - (this.sampleIdx > (d?.n ?? 0) ? inSample : 0);
      } else if (!d) {
        left += p.samples * p.estimateS;
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
    this.done.set(id, { n: 0, seconds: 0 });
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
