// Scatter plot of raw samples against VM size or VM count, with the fitted line, as a standalone SVG.
import { COLORS, esc } from '../svg-chart.js';

export interface XySeries {
  name: string;
  points: { x: number; y: number }[];
  /** The least-squares line to draw over the points' x range. */
  fit?: { slope: number | null; intercept: number | null; label: string };
}

const tick = (v: number) => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(2));

export function scatterChart(opts: { title: string; xLabel: string; yLabel: string; series: XySeries[]; note?: string }): string {
  const width = 720, height = 420;
  const left = 80, right = 20, top = 50, bottom = 90;
  const plotW = width - left - right, plotH = height - top - bottom;
  const all = opts.series.flatMap((s) => s.points);
  const xMax = Math.max(1e-9, ...all.map((p) => p.x)) * 1.08;
  const yMax = Math.max(1e-9, ...all.map((p) => p.y)) * 1.15;
  const X = (v: number) => left + (v / xMax) * plotW;
  const Y = (v: number) => top + plotH - (Math.max(0, v) / yMax) * plotH;
  const out: string[] = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif" font-size="12">`);
  out.push(`<rect width="100%" height="100%" fill="white"/>`);
  out.push(`<text x="${width / 2}" y="24" text-anchor="middle" font-size="15">${esc(opts.title)}</text>`);
  for (let i = 0; i <= 5; i++) {
    const v = (yMax / 5) * i;
    out.push(`<line x1="${left}" x2="${width - right}" y1="${Y(v)}" y2="${Y(v)}" stroke="#ddd"/>`);
    out.push(`<text x="${left - 6}" y="${Y(v) + 4}" text-anchor="end">${tick(v)}</text>`);
  }
  const xs = [...new Set(all.map((p) => p.x))].sort((a, b) => a - b);
  for (const x of xs) out.push(`<text x="${X(x)}" y="${top + plotH + 16}" text-anchor="middle">${tick(x)}</text>`);
  out.push(`<line x1="${left}" x2="${width - right}" y1="${top + plotH}" y2="${top + plotH}" stroke="#333"/>`);
  out.push(`<text x="${left + plotW / 2}" y="${top + plotH + 34}" text-anchor="middle">${esc(opts.xLabel)}</text>`);
  out.push(`<text x="18" y="${top + plotH / 2}" transform="rotate(-90 18 ${top + plotH / 2})" text-anchor="middle">${esc(opts.yLabel)}</text>`);
  opts.series.forEach((s, si) => {
    const c = COLORS[si % COLORS.length];
    for (const p of s.points) out.push(`<circle cx="${X(p.x)}" cy="${Y(p.y)}" r="4" fill="${c}"><title>${esc(s.name)}: ${tick(p.x)} → ${tick(p.y)}</title></circle>`);
    if (s.fit && s.fit.slope !== null && s.fit.intercept !== null && s.points.length) {
      const x0 = Math.min(...s.points.map((p) => p.x)), x1 = Math.max(...s.points.map((p) => p.x));
      const y0 = s.fit.intercept + s.fit.slope * x0, y1 = s.fit.intercept + s.fit.slope * x1;
      out.push(`<line x1="${X(x0)}" y1="${Y(y0)}" x2="${X(x1)}" y2="${Y(y1)}" stroke="${c}" stroke-dasharray="6 4"/>`);
    }
    const ly = height - 44 + si * 16;
    out.push(`<rect x="${left}" y="${ly - 10}" width="12" height="12" fill="${c}"/>`);
    out.push(`<text x="${left + 16}" y="${ly}">${esc(s.name)}${s.fit ? ` — fit: ${esc(s.fit.label)}` : ''}</text>`);
  });
  if (opts.note) out.push(`<text x="${width - right}" y="${height - 8}" text-anchor="end" fill="#666">${esc(opts.note)}</text>`);
  out.push('</svg>');
  return out.join('\n');
}
