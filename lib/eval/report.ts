// The report `evaluate` emits: one object per policy x source x mode, in the SCBench-style schema of
// the scbench method spec (methods/scbench.md) (last section), plus a few fields that schema asks to report beside
// the ratio (retainedRatio, metaBytes) and the needle measures of kvslim's synthetic workloads.
import type { PolicySpec, ResolvedPolicy } from '../policy.js';

/** The `schema` value of reports this version writes. */
export const REPORT_SCHEMA = 'scbench-report/1';

/** Memory of the cache after a turn, from `cache.stats()` (bytes summed over layers). */
export interface TurnMemory {
  /** The same tokens as a plain f16 cache (SCBench's full-KV baseline). */
  kvBytesFull: number;
  /** K and V (and quantization residuals) held on the GPU. */
  kvBytesDevice: number;
  /** K and V (and residuals) held in host memory. */
  kvBytesHost: number;
  indexBytes: number;
  summaryBytes: number;
  /** Page tables and other bookkeeping. */
  metaBytes: number;
  /** Page memory reserved on the GPU (0 on the CPU). */
  peakDeviceBytes: number;
  /** Tokens kept (mean over layers x kv heads). */
  retainedTokens: number;
  /** retainedTokens / tokens seen. */
  retainedRatio: number;
  /** SCBench's tau: all bytes held / kvBytesFull. */
  compressionRatio: number;
}

/** Milliseconds per lifecycle stage of one turn. */
export interface TurnLatency {
  /** Building the shared context (append + prefill of the observed window): turn 1 only. */
  prefill: number;
  indexBuild: number;
  compress: number;
  cacheLoad: number;
  /** All query tokens of the turn, one decode step per token (all layers). */
  decodeTotal: number;
  decodePerTokenMean: number;
  decodePerTokenP50: number;
  decodePerTokenP99: number;
  retrievalPerStepMean: number;
}

/** Fidelity of one turn against exact attention on the f32 data (means over layers x query tokens x q heads). */
export interface TurnFidelity {
  /** Needle hit rate of the policy (null: the source has no needles). */
  taskScore: number | null;
  /** Needle hit rate of exact attention. */
  taskScoreFull: number | null;
  /** Not measured: kvslim sees attention layers, not a language model's logits. */
  greedyTokenAgreement: null;
  logitKLMean: null;
  attnOutCosineMean: number;
  attnOutRelL2Mean: number;
  /** Exact softmax mass on the kept tokens (1 when every token is kept). */
  attnMassRecallMean: number;
  /** Overlap of the kept tokens with the exact top-32 (1 when every token is kept). */
  topkRecallMean: number;
  /** Share of (needle query, q head) pairs whose exact top score is the needle's key (null: no needles). */
  needleArgmaxRate: number | null;
}

/** One query turn. */
export interface TurnReport {
  turn: number;
  queryTokens: number;
  /** Tokens decoded: every query token is one decode step. */
  genTokens: number;
  memory: TurnMemory;
  latencyMs: TurnLatency;
  fidelity: TurnFidelity;
}

/** The SCBench-style report of one policy on one source in one mode. */
export interface Report {
  schema: typeof REPORT_SCHEMA;
  engine: string;
  device: string;
  model: { name: string; layers: number; qHeads: number; kvHeads: number; headDim: number; kvDtype: string };
  method: { name: string; stage: string; params: PolicySpec; kvClass: 'O(n)' | 'O(k)' };
  mode: 'multi-turn' | 'multi-request';
  task: string;
  sessionId: string;
  contextTokens: number;
  turns: TurnReport[];
  summary: {
    scoreMean: number | null;
    scoreFullMean: number | null;
    compressionRatioMean: number;
    decodePerTokenMeanMs: number;
    prefillMs: number;
    attnOutRelL2Mean: number;
    attnOutCosineMean: number;
  };
}

/**
 * A short name of a policy: `full`, `full/bf16`, `full/kivi2`, `snapkv:1024`, `streaming:4+1020`,
 * ... (the store is named when it is not f16; a selection's budget follows its kind).
 */
export function policyName(policy: ResolvedPolicy): string {
  const store = policy.store.kind === 'kivi' ? `kivi${policy.store.bits}` : policy.store.kind;
  const s = policy.select;
  const select = s.kind === 'streaming' ? `streaming:${s.sink}+${s.window}`
    : s.kind === 'snapkv' || s.kind === 'pyramidkv' || s.kind === 'h2o' ? `${s.kind}:${s.budget}`
      : s.kind === 'duo' ? `duo:${s.sink}+${s.window}`
        : s.kind === 'quest' ? `quest:${s.pages}x${s.pageSize}`
          : s.kind === 'retrieval' ? `${s.index.kind}:${s.topK}`
            : s.kind === 'actqkv' ? `actqkv:${s.blocks}x${s.blockSize}` : s.kind;
  return store === 'f16' ? select : `${select}/${store}`;
}

const mean = (values: number[]) => (values.length === 0 ? 0 : values.reduce((a, b) => a + b, 0) / values.length);

/** Mean of the non-null values, null when all are null. */
export function meanOrNull(values: Array<number | null>): number | null {
  const present = values.filter((value): value is number => value !== null);
  return present.length === 0 ? null : mean(present);
}

/** The summary block of a report from its turns. */
export function summarizeTurns(turns: TurnReport[]): Report['summary'] {
  return {
    scoreMean: meanOrNull(turns.map((t) => t.fidelity.taskScore)),
    scoreFullMean: meanOrNull(turns.map((t) => t.fidelity.taskScoreFull)),
    compressionRatioMean: mean(turns.map((t) => t.memory.compressionRatio)),
    decodePerTokenMeanMs: mean(turns.map((t) => t.latencyMs.decodePerTokenMean)),
    prefillMs: turns.reduce((sum, t) => sum + t.latencyMs.prefill, 0),
    attnOutRelL2Mean: mean(turns.map((t) => t.fidelity.attnOutRelL2Mean)),
    attnOutCosineMean: mean(turns.map((t) => t.fidelity.attnOutCosineMean)),
  };
}

const percent = (value: number | null) => (value === null ? '-' : `${(100 * value).toFixed(1)}%`);

/** A plain-text table: one row per report (policy x mode), then per-turn needle hit rates. */
export function formatTable(reports: readonly Report[]): string {
  const header = ['policy', 'mode', 'ratio', 'relL2', 'cosine', 'needles', 'exact', 'prefill ms', 'decode ms/tok', 'p99 ms', 'per turn'];
  const rows = reports.map((r) => {
    const p99 = Math.max(...r.turns.map((t) => t.latencyMs.decodePerTokenP99));
    return [
      r.method.name, r.mode, r.summary.compressionRatioMean.toFixed(3), r.summary.attnOutRelL2Mean.toExponential(2),
      r.summary.attnOutCosineMean.toFixed(6), percent(r.summary.scoreMean), percent(r.summary.scoreFullMean),
      r.summary.prefillMs.toFixed(0), r.summary.decodePerTokenMeanMs.toFixed(2), p99.toFixed(2),
      r.turns.map((t) => percent(t.fidelity.taskScore)).join(' '),
    ];
  });
  const widths = header.map((title, column) => Math.max(title.length, ...rows.map((row) => row[column].length)));
  const line = (cells: string[]) => cells.map((cell, column) => (column < 2 || column === cells.length - 1 ? cell.padEnd(widths[column]) : cell.padStart(widths[column]))).join('  ').trimEnd();
  const first = reports[0];
  const title = first === undefined ? '' : `${first.task}: ${first.contextTokens} context tokens, ${first.turns.length} turns, ` +
    `${first.model.layers}x${first.model.qHeads}q/${first.model.kvHeads}kv/${first.model.headDim} (${first.device})\n`;
  return title + [line(header), line(widths.map((w) => '-'.repeat(w))), ...rows.map(line)].join('\n') + '\n';
}
