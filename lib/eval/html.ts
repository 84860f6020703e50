// One self-contained HTML page (inline SVG and CSS, no script, no network) of `evaluate` reports:
// memory ratio against output error per policy, needle hit rate per turn per policy, and stage
// latency bars.
import type { Report } from './report.js';

const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf', '#7f7f7f', '#bcbd22'];
const WIDTH = 640, HEIGHT = 320, LEFT = 70, RIGHT = 170, TOP = 20, BOTTOM = 50;
const plotWidth = WIDTH - LEFT - RIGHT, plotHeight = HEIGHT - TOP - BOTTOM;

function escape(text: string): string {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

const label = (r: Report) => `${r.method.name} (${r.mode})`;

function legend(reports: readonly Report[]): string {
  return reports.map((r, i) => `<rect x="${WIDTH - RIGHT + 12}" y="${TOP + 18 * i}" width="10" height="10" fill="${COLORS[i % COLORS.length]}"/>` +
    `<text x="${WIDTH - RIGHT + 28}" y="${TOP + 18 * i + 9}">${escape(label(r))}</text>`).join('');
}

function axes(xTitle: string, yTitle: string, xTicks: Array<[number, string]>, yTicks: Array<[number, string]>): string {
  const x = xTicks.map(([px, text]) => `<line x1="${px}" y1="${TOP + plotHeight}" x2="${px}" y2="${TOP + plotHeight + 4}" stroke="#333"/><text x="${px}" y="${TOP + plotHeight + 16}" text-anchor="middle">${escape(text)}</text>`).join('');
  const y = yTicks.map(([py, text]) => `<line x1="${LEFT}" y1="${py}" x2="${LEFT + plotWidth}" y2="${py}" stroke="#eee"/><text x="${LEFT - 6}" y="${py + 4}" text-anchor="end">${escape(text)}</text>`).join('');
  return `<rect x="${LEFT}" y="${TOP}" width="${plotWidth}" height="${plotHeight}" fill="none" stroke="#333"/>${y}${x}` +
    `<text x="${LEFT + plotWidth / 2}" y="${HEIGHT - 10}" text-anchor="middle">${escape(xTitle)}</text>` +
    `<text transform="translate(14 ${TOP + plotHeight / 2}) rotate(-90)" text-anchor="middle">${escape(yTitle)}</text>`;
}

const svg = (title: string, body: string) =>
  `<figure><figcaption>${escape(title)}</figcaption><svg xmlns="http://www.w3.org/2000/svg" width="${WIDTH}" height="${HEIGHT}" viewBox="0 0 ${WIDTH} ${HEIGHT}">${body}</svg></figure>`;

/** Memory ratio (x, linear from 0) against output relative L2 error (y, log10). */
function ratioVersusError(reports: readonly Report[]): string {
  const maxRatio = Math.max(1.1, ...reports.map((r) => r.summary.compressionRatioMean)) * 1.1;
  const errors = reports.map((r) => Math.log10(Math.max(1e-9, r.summary.attnOutRelL2Mean)));
  const low = Math.floor(Math.min(...errors, -4)), high = Math.ceil(Math.max(...errors, -1));
  const px = (ratio: number) => LEFT + (ratio / maxRatio) * plotWidth;
  const py = (log: number) => TOP + plotHeight - ((log - low) / (high - low)) * plotHeight;
  const xTicks = Array.from({ length: 5 }, (_, i): [number, string] => [px((maxRatio * i) / 4), ((maxRatio * i) / 4).toFixed(2)]);
  const yTicks = Array.from({ length: high - low + 1 }, (_, i): [number, string] => [py(low + i), `1e${low + i}`]);
  const points = reports.map((r, i) => `<circle cx="${px(r.summary.compressionRatioMean).toFixed(1)}" cy="${py(errors[i]).toFixed(1)}" r="5" fill="${COLORS[i % COLORS.length]}"><title>${escape(label(r))}: ratio ${r.summary.compressionRatioMean.toFixed(3)}, relL2 ${r.summary.attnOutRelL2Mean.toExponential(2)}</title></circle>`).join('');
  return svg('Memory ratio (bytes / full f16) vs attention output relative L2 error', axes('compression ratio (tau)', 'output rel. L2 (log)', xTicks, yTicks) + points + legend(reports));
}

/** Needle hit rate (y, 0-100%) per turn (x) per policy; exact attention dashed. */
function needlesPerTurn(reports: readonly Report[]): string {
  const turns = Math.max(1, ...reports.map((r) => r.turns.length));
  const px = (turn: number) => LEFT + (turns === 1 ? plotWidth / 2 : ((turn - 1) / (turns - 1)) * plotWidth);
  const py = (rate: number) => TOP + plotHeight - rate * plotHeight;
  const xTicks = Array.from({ length: turns }, (_, i): [number, string] => [px(i + 1), String(i + 1)]);
  const yTicks = [0, 0.25, 0.5, 0.75, 1].map((rate): [number, string] => [py(rate), `${rate * 100}%`]);
  const line = (points: Array<[number, number | null]>, color: string, dashed: boolean, offset: number) => {
    const present = points.filter((p): p is [number, number] => p[1] !== null).map(([turn, rate]) => `${px(turn).toFixed(1)},${(py(rate) + offset).toFixed(1)}`);
    if (present.length === 0) return '';
    return `<polyline points="${present.join(' ')}" fill="none" stroke="${color}" stroke-width="2"${dashed ? ' stroke-dasharray="4 3"' : ''}/>` +
      present.map((p) => `<circle cx="${p.split(',')[0]}" cy="${p.split(',')[1]}" r="3" fill="${color}"/>`).join('');
  };
  // Policies with equal rates would hide each other: shift each by a pixel or two.
  const body = reports.map((r, i) => line(r.turns.map((t) => [t.turn, t.fidelity.taskScore]), COLORS[i % COLORS.length], false, 2 * i - reports.length)).join('') +
    (reports[0] ? line(reports[0].turns.map((t) => [t.turn, t.fidelity.taskScoreFull]), '#000', true, 0) : '');
  const hasNeedles = reports.some((r) => r.summary.scoreMean !== null);
  return svg('Needle hit rate per turn (dashed: exact attention)', axes('turn', 'needle hit rate', xTicks, yTicks) + body + legend(reports) +
    (hasNeedles ? '' : `<text x="${LEFT + plotWidth / 2}" y="${TOP + plotHeight / 2}" text-anchor="middle">no needles in this source</text>`));
}

const STAGES = [
  ['prefill', '#4e79a7'], ['compress', '#f28e2b'], ['indexBuild', '#e15759'], ['decodeTotal', '#76b7b2'], ['retrieval', '#59a14f'],
] as const;

/** Milliseconds per lifecycle stage per policy, summed over turns: grouped horizontal bars. */
function stageLatency(reports: readonly Report[]): string {
  const totals = reports.map((r) => {
    const sum = (pick: (t: Report['turns'][number]) => number) => r.turns.reduce((total, t) => total + pick(t), 0);
    return {
      prefill: sum((t) => t.latencyMs.prefill), compress: sum((t) => t.latencyMs.compress), indexBuild: sum((t) => t.latencyMs.indexBuild),
      decodeTotal: sum((t) => t.latencyMs.decodeTotal), retrieval: sum((t) => t.latencyMs.retrievalPerStepMean * t.genTokens),
    };
  });
  const max = Math.max(1, ...totals.flatMap((t) => Object.values(t)));
  const band = plotHeight / Math.max(1, reports.length);
  const bar = band / (STAGES.length + 1);
  const px = (ms: number) => LEFT + (ms / max) * plotWidth;
  const xTicks = Array.from({ length: 5 }, (_, i): [number, string] => [px((max * i) / 4), ((max * i) / 4).toFixed(0)]);
  const body = totals.map((t, i) => STAGES.map(([stage, color], s) => {
    const y = TOP + i * band + (s + 1) * bar; // the first bar's slot holds the policy's label
    return `<rect x="${LEFT}" y="${y.toFixed(1)}" width="${Math.max(0, px(t[stage]) - LEFT).toFixed(1)}" height="${(bar * 0.9).toFixed(1)}" fill="${color}"><title>${escape(label(reports[i]))} ${stage}: ${t[stage].toFixed(1)} ms</title></rect>`;
  }).join('') + `<text x="${LEFT + 4}" y="${(TOP + i * band + bar * 0.8).toFixed(1)}" font-size="10">${escape(label(reports[i]))}</text>`).join('');
  const stageLegend = STAGES.map(([stage, color], s) => `<rect x="${WIDTH - RIGHT + 12}" y="${TOP + 18 * s}" width="10" height="10" fill="${color}"/><text x="${WIDTH - RIGHT + 28}" y="${TOP + 18 * s + 9}">${stage}</text>`).join('');
  return svg('Stage latency per policy (ms, summed over turns)', axes('milliseconds', '', xTicks, []) + body + stageLegend);
}

/** The reports as one self-contained HTML page. */
export function renderHtml(reports: readonly Report[]): string {
  const first = reports[0];
  const title = first === undefined ? 'kvslim evaluation' : `kvslim evaluation: ${first.task}`;
  const rows = reports.map((r) => `<tr><td>${escape(r.method.name)}</td><td>${r.mode}</td><td>${r.summary.compressionRatioMean.toFixed(3)}</td>` +
    `<td>${r.summary.attnOutRelL2Mean.toExponential(2)}</td><td>${r.summary.attnOutCosineMean.toFixed(6)}</td>` +
    `<td>${r.summary.scoreMean === null ? '-' : (100 * r.summary.scoreMean).toFixed(1) + '%'}</td>` +
    `<td>${r.summary.prefillMs.toFixed(0)}</td><td>${r.summary.decodePerTokenMeanMs.toFixed(2)}</td></tr>`).join('');
  const facts = first === undefined ? '' : `<p>${escape(first.engine)} on ${escape(first.device)}; ${first.contextTokens} context tokens, ` +
    `${first.turns.length} turns; ${first.model.layers} layer(s), ${first.model.qHeads} q heads, ${first.model.kvHeads} kv heads, head dim ${first.model.headDim}.</p>`;
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>${escape(title)}</title>
<style>body{font:14px system-ui,sans-serif;margin:24px;color:#222}svg text{font:11px system-ui,sans-serif}
figure{margin:16px 0}figcaption{font-weight:600;margin-bottom:4px}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}</style></head>
<body><h1>${escape(title)}</h1>${facts}
<table><tr><th>policy</th><th>mode</th><th>ratio</th><th>rel. L2</th><th>cosine</th><th>needles</th><th>prefill ms</th><th>decode ms/token</th></tr>${rows}</table>
${ratioVersusError(reports)}
${needlesPerTurn(reports)}
${stageLatency(reports)}
</body></html>
`;
}
