// How results are shown and kept: aligned tables streamed to stdout as rows complete, the headline
// against the targets, the notes that say what each column means, and the JSON record.
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';

import type { CaseRun, CaseSpec } from './cases.js';
import type { TimeStats } from './timing.js';

/** One row of the record: a case and every number derived from it. */
export interface CaseResult extends CaseSpec {
  /** Queries per call: 1 for decode, `tokens` for prefill. */
  queries: number;
  /** ok; FAILED: output off the reference, not timed; ERROR: the call threw. */
  status: 'ok' | 'FAILED' | 'ERROR';
  error?: string;
  check?: CaseRun['check'];
  time?: TimeStats;
  fillMs?: number;
  /** Decode: K+V bytes read per step. */
  bytesRead?: number;
  gbPerSecond?: number;
  /** GB/s over the measured read bandwidth (null on CUDA: no GPU probe). */
  bandwidthFraction?: number | null;
  /** Prefill: FLOPs per call. */
  flops?: number;
  gflopsPerSecond?: number;
  /** GFLOP/s over the measured FMA peak (null on CUDA). */
  peakFraction?: number | null;
  /** The plain-JS peer this row is compared with. */
  baseline?: { id: string; tokens: number; medianMs: number; gflopsPerSecond?: number };
  speedup?: number;
  speedupBasis?: string;
  /** One line that reruns this row alone. */
  reproduce: string;
}

/** A row of a plain-JS baseline, shown in the table beside the cases it is the peer of. */
export interface BaselineResult {
  id: string;
  kind: 'decode' | 'prefill';
  tokens: number;
  queries: number;
  reads: 'f32';
  time: TimeStats;
  bytesRead?: number;
  gbPerSecond?: number;
  bandwidthFraction?: number;
  flops?: number;
  gflopsPerSecond?: number;
  peakFraction?: number;
  /** Case ids that reuse this measurement. */
  sharedBy: string[];
}

export interface TargetResult {
  name: string;
  caseId: string;
  value: number | null;
  target: number;
  unit: 'fraction' | 'x' | 'percent';
  /** The target is a ceiling (value <= target), not a floor. */
  atMost?: boolean;
  /** suspect: a fraction above 1, i.e. faster than the probed limit; the probe read low. */
  verdict: 'met' | 'not met' | 'suspect' | 'not measured' | 'FAILED' | 'ERROR';
}

interface Column {
  title: string;
  width: number;
  left?: boolean;
}

/** A fixed-width table: print the header once, then rows as they come. */
export class Table {
  constructor(private readonly columns: Column[]) {}

  header(): string {
    const titles = this.line(this.columns.map((c) => c.title));
    return `${titles}\n${'-'.repeat(titles.length)}`;
  }

  line(cells: string[]): string {
    return this.columns
      .map((column, i) => {
        const cell = cells[i] ?? '';
        return column.left ? cell.padEnd(column.width) : cell.padStart(column.width);
      })
      .join('  ')
      .trimEnd();
  }
}

export const decodeTable = new Table([
  { title: 'case', width: 22, left: true }, { title: 'rel.err', width: 8 }, { title: 'ms', width: 8 },
  { title: 'spread ms', width: 16 }, { title: 'runs', width: 4 }, { title: 'KV MB', width: 7 },
  { title: 'GB/s', width: 6 }, { title: 'x BW', width: 5 }, { title: 'JS ms', width: 8 }, { title: 'speed-up', width: 8 },
]);

export const prefillTable = new Table([
  { title: 'case', width: 22, left: true }, { title: 'rel.err', width: 8 }, { title: 'ms', width: 8 },
  { title: 'spread ms', width: 16 }, { title: 'runs', width: 4 }, { title: 'GFLOP', width: 7 },
  { title: 'GFLOP/s', width: 7 }, { title: 'x peak', width: 6 }, { title: 'JS GFLOP/s', width: 10 }, { title: 'speed-up', width: 8 },
]);

const DASH = '-';

/** Milliseconds with three significant digits, never in exponent form. */
export function ms(value: number): string {
  if (value >= 100) return value.toFixed(0);
  if (value >= 10) return value.toFixed(1);
  if (value >= 1) return value.toFixed(2);
  return value.toFixed(3);
}

/** The GPU's whole-prompt prefills of the policies section (PoliciesRecord.gpuPrefill), in one sentence. */
export function gpuPrefillText(long: {
  tokens: number; runs: number; rows: Array<{ kind: string; medianMs: number; selectMs: number; overhead: number }>;
}): string {
  const [full, ...rest] = long.rows;
  const share = (overhead: number) => `${overhead >= 0 ? '+' : ''}${(overhead * 100).toFixed(1)}%`;
  return `One prefill() of a whole ${long.tokens / 1024}K-token prompt on the GPU takes ${ms(full.medianMs)} ms with the full cache; ` +
    rest.map((r) => `${r.kind} 1/8 ${share(r.overhead)} (select ${ms(r.selectMs)} ms)`).join(', ') +
    ` (medians of ${long.runs} interleaved runs)`;
}

export function num(value: number | null | undefined, digits = 1): string {
  return value === null || value === undefined || !Number.isFinite(value) ? DASH : value.toFixed(digits);
}

function spread(time: TimeStats): string {
  return `${ms(time.spreadLowMs)}-${ms(time.spreadHighMs)}`;
}

function errorCell(result: CaseResult): string {
  if (result.status === 'ERROR') return 'ERROR';
  if (result.check === undefined) return DASH;
  const value = result.check.relL2Error;
  return Number.isFinite(value) ? value.toExponential(1) : String(value);
}

function speedup(value: number | undefined): string {
  return value === undefined ? DASH : `${value >= 100 ? value.toFixed(0) : value.toFixed(1)}x`;
}

/** The table line of a case; failed and errored cases say so instead of figures. */
export function caseLine(result: CaseResult): string {
  const table = result.kind === 'decode' ? decodeTable : prefillTable;
  const time = result.time;
  if (result.status !== 'ok' || time === undefined) {
    const why = result.status === 'FAILED' ? `FAILED: rel.err above ${result.check?.tolerance}, not timed` : `ERROR: ${result.error}`;
    return `${table.line([result.id, errorCell(result)])}  ${why}`;
  }
  const js = result.baseline;
  if (result.kind === 'decode') {
    return table.line([
      result.id, errorCell(result), ms(time.medianMs), spread(time), String(time.runs), num((result.bytesRead ?? 0) / 1e6),
      num(result.gbPerSecond), num(result.bandwidthFraction, 2), js ? ms(js.medianMs) : DASH, speedup(result.speedup),
    ]);
  }
  return table.line([
    result.id, errorCell(result), ms(time.medianMs), spread(time), String(time.runs), num((result.flops ?? 0) / 1e9),
    num(result.gflopsPerSecond), num(result.peakFraction, 2), js?.gflopsPerSecond === undefined ? DASH : num(js.gflopsPerSecond, 2),
    speedup(result.speedup),
  ]);
}

export function baselineLine(result: BaselineResult): string {
  const time = result.time;
  if (result.kind === 'decode') {
    return decodeTable.line([
      result.id, 'ref', ms(time.medianMs), spread(time), String(time.runs), num((result.bytesRead ?? 0) / 1e6),
      num(result.gbPerSecond, 2), num(result.bandwidthFraction, 3), DASH, DASH,
    ]);
  }
  return prefillTable.line([
    result.id, 'ref', ms(time.medianMs), spread(time), String(time.runs), num((result.flops ?? 0) / 1e9),
    num(result.gflopsPerSecond, 2), num(result.peakFraction, 4), DASH, DASH,
  ]);
}

/** A target's measured figure in its unit ('-' when not measured). */
export function targetValueText(t: TargetResult): string {
  if (t.value === null) return DASH;
  // Ratios near their goal (1.25x) need two decimals to show which side they fall on.
  if (t.unit === 'x') return `${t.value.toFixed(t.value >= 100 ? 0 : t.value >= 10 ? 1 : 2)}x`;
  if (t.unit === 'percent') return `${Math.abs(t.value) < 1e-3 && t.value !== 0 ? (t.value * 100).toPrecision(2) : (t.value * 100).toFixed(1)}%`;
  return t.value.toFixed(2);
}

/** A target's goal, e.g. ">= 0.85", "<= 5%". */
export function targetGoalText(t: TargetResult): string {
  const sign = t.atMost ? '<=' : '>=';
  return t.unit === 'x' ? `${sign} ${t.target}x` : t.unit === 'percent' ? `${sign} ${t.target * 100}%` : `${sign} ${t.target.toFixed(2)}`;
}

/** The headline: each target, the figure this run measured, and whether it is met. */
export function targetLines(targets: TargetResult[]): string[] {
  const width = Math.max(...targets.map((t) => t.name.length));
  return targets.map((t) => `  ${t.name.padEnd(width)}  ${targetValueText(t).padStart(7)}   target ${targetGoalText(t).padEnd(7)}  ${t.verdict}`);
}

export function writeJson(path: string, record: unknown): void {
  mkdirSync(dirname(path), { recursive: true });
  writeFileSync(path, `${JSON.stringify(record, null, 2)}\n`);
}
