// Least-squares linear fit of a measured cost against VM size or VM count, and the verdict "flat" or "slope per unit".

export interface LinearFit {
  /** Points used (repeated x values count as separate points). */
  n: number;
  slope: number | null;
  intercept: number | null;
  /** Standard error of the slope from the residuals (null below 3 points). */
  slopeSe: number | null;
  r2: number | null;
  verdict: 'flat' | 'grows' | 'shrinks' | 'too few points';
  /** One phrase for a table: "flat (+0.3 ± 0.4 ms per GB)" or "+12.1 ms per GB (± 0.9)". */
  text: string;
}

const num = (v: number) => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(2));
const signed = (v: number) => (v >= 0 ? `+${num(v)}` : num(v));

/**
 * Ordinary least squares y = intercept + slope·x. The slope counts as noise
 * ("flat") when it lies within two standard errors of zero, i.e. the
 * residual scatter explains it; with fewer than three points, or a single x
 * value, no verdict is given.
 */
export function linearFit(points: { x: number; y: number }[], unit: string, perWhat: string): LinearFit {
  const pts = points.filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y));
  const n = pts.length;
  const xs = new Set(pts.map((p) => p.x));
  if (n < 3 || xs.size < 2) {
    return { n, slope: null, intercept: null, slopeSe: null, r2: null, verdict: 'too few points', text: `not fitted (${n} point${n === 1 ? '' : 's'}, ${xs.size} distinct ${perWhat} value${xs.size === 1 ? '' : 's'})` };
  }
  const mx = pts.reduce((s, p) => s + p.x, 0) / n;
  const my = pts.reduce((s, p) => s + p.y, 0) / n;
  let sxx = 0, sxy = 0, syy = 0;
  for (const p of pts) {
    sxx += (p.x - mx) ** 2;
    sxy += (p.x - mx) * (p.y - my);
    syy += (p.y - my) ** 2;
  }
  const slope = sxy / sxx;
  const intercept = my - slope * mx;
  const ssRes = pts.reduce((s, p) => s + (p.y - (intercept + slope * p.x)) ** 2, 0);
  const slopeSe = Math.sqrt(ssRes / (n - 2) / sxx);
  const r2 = syy > 0 ? 1 - ssRes / syy : 1;
  const flat = Math.abs(slope) <= 2 * slopeSe;
  const verdict = flat ? 'flat' : slope > 0 ? 'grows' : 'shrinks';
  const text = flat
    ? `flat (slope ${signed(slope)} ± ${num(slopeSe)} ${unit} per ${perWhat}, within noise)`
    : `${signed(slope)} ${unit} per ${perWhat} (± ${num(slopeSe)}, R² ${r2.toFixed(2)})`;
  return { n, slope, intercept, slopeSe, r2, verdict, text };
}
