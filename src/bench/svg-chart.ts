/**
 * Grouped bar charts as standalone SVG files for the benchmark reports.
 * Hand-written because the chart libraries for Node render through a native
 * canvas or a headless browser, both heavy to install for a few bars.
 */
export interface BarSeries {
  name: string;
  values: (number | null)[];
}

/** The series palette every benchmark chart uses. */
export const COLORS = ['#4e79a7', '#f28e2b', '#59a14f', '#e15759', '#76b7b2', '#edc948'];

/** Text for an SVG element. */
export function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

export function barChart(opts: { title: string; unit: string; categories: string[]; series: BarSeries[]; target?: { value: number; label: string } }): string {
  const width = Math.max(640, 90 * opts.categories.length + 160);
  const height = 380;
  const left = 70, right = 20, top = 50, bottom = 80;
  const plotW = width - left - right;
  const plotH = height - top - bottom;
  const all = opts.series.flatMap((s) => s.values.filter((v): v is number => v !== null));
  if (opts.target) all.push(opts.target.value);
  const max = Math.max(1e-9, ...all) * 1.1;
  const y = (v: number) => top + plotH - (v / max) * plotH;
  const groupW = plotW / Math.max(1, opts.categories.length);
  const barW = (groupW * 0.8) / Math.max(1, opts.series.length);
  const out: string[] = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif" font-size="12">`);
  out.push(`<rect width="100%" height="100%" fill="white"/>`);
  out.push(`<text x="${width / 2}" y="24" text-anchor="middle" font-size="15">${esc(opts.title)}</text>`);
  for (let i = 0; i <= 5; i++) {
    const v = (max / 5) * i;
    out.push(`<line x1="${left}" x2="${width - right}" y1="${y(v)}" y2="${y(v)}" stroke="#ddd"/>`);
    out.push(`<text x="${left - 6}" y="${y(v) + 4}" text-anchor="end">${v >= 100 ? v.toFixed(0) : v.toFixed(1)}</text>`);
  }
  out.push(`<text x="16" y="${top + plotH / 2}" transform="rotate(-90 16 ${top + plotH / 2})" text-anchor="middle">${esc(opts.unit)}</text>`);
  opts.categories.forEach((c, ci) => {
    const gx = left + ci * groupW + groupW * 0.1;
    opts.series.forEach((s, si) => {
      const v = s.values[ci];
      if (v === null || v === undefined) return;
      out.push(`<rect x="${gx + si * barW}" y="${y(v)}" width="${barW - 2}" height="${top + plotH - y(v)}" fill="${COLORS[si % COLORS.length]}"><title>${esc(s.name)}: ${v.toFixed(2)} ${esc(opts.unit)}</title></rect>`);
    });
    out.push(`<text x="${left + ci * groupW + groupW / 2}" y="${top + plotH + 16}" text-anchor="middle">${esc(c)}</text>`);
  });
  if (opts.target) {
    out.push(`<line x1="${left}" x2="${width - right}" y1="${y(opts.target.value)}" y2="${y(opts.target.value)}" stroke="#c00" stroke-dasharray="6 4"/>`);
    out.push(`<text x="${width - right}" y="${y(opts.target.value) - 4}" text-anchor="end" fill="#c00">${esc(opts.target.label)}</text>`);
  }
  opts.series.forEach((s, si) => {
    const lx = left + si * 160;
    out.push(`<rect x="${lx}" y="${height - 28}" width="12" height="12" fill="${COLORS[si % COLORS.length]}"/>`);
    out.push(`<text x="${lx + 16}" y="${height - 18}">${esc(s.name)}</text>`);
  });
  out.push('</svg>');
  return out.join('\n');
}
