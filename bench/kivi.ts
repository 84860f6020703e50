// The KIVI section of `npm run bench` (methods/kivi.md): decode over KIVI-8/4/2 caches beside the
// f16 cache of the same T (bytes read, fraction of the measured bandwidth on those bytes, speed-up,
// compression), and quality on a workload whose keys have a few large-magnitude channels: output
// error vs exact f32 attention, needle hit rate, and the ablation with keys quantized per token;
// plus, per bit width, the store with KVQuant's dense-and-sparse outliers (policy.store.outliers),
// and KVQuant's pre-RoPE keys (policy.store.preRope) against plain KIVI over the rotated keys.
import { attention, dequantize, KVCache, type MachineLimits, quantize } from '../lib/index.js';
import { relativeL2Error } from './baseline.js';
import { APPEND_CHUNK_TOKENS, MODEL, QUERY_STRIDE, TOKEN_STRIDE, tokenLabel, TOLERANCE } from './cases.js';
import { gridValues } from './data.js';
import { ms, num, Table, type TargetResult } from './report.js';
import { EVICT_BYTES, elapsedMs, evictCaches, measure, type TimeStats, type TimingPlan } from './timing.js';

export const KIVI_BITS = [8, 4, 2] as const;
export type KiviBits = (typeof KIVI_BITS)[number];
/** The KIVI defaults of LongBench (methods/kivi.md): groups of 32, residual 128. */
export const KIVI_GROUP = 32;
export const KIVI_RESIDUAL = 128;

/**
 * Largest relative L2 error vs exact attention a decode row may show and still be timed: a sanity
 * bound that fails a broken kernel (its output lands near 1 or beyond), not a quality target. The
 * timing data are uniform in [-2, 2), the worst case for a min-max quantizer: observed about 0.006
 * (8-bit), 0.10 (4-bit) and 0.57-0.59 (2-bit). The tight check of the kernels is the quality
 * section's mirror check.
 */
export const KIVI_SANITY: Record<KiviBits, number> = { 8: 0.02, 4: 0.2, 2: 0.8 };
/** Largest relative L2 between the cache's output and attention() over the K and V it holds (rebuilt with quantize()/dequantize()). */
export const MIRROR_TOLERANCE = 1e-4;
/** The dense-and-sparse rows of the quality table: this fraction of each vector kept exactly. */
export const KIVI_OUTLIER_FRACTION = 0.01;

/** The outlier workload: per kv head, OUTLIER_CHANNELS channels (one per 32-channel group) scaled and offset. */
const OUTLIER_CHANNELS = 4;
const OUTLIER_SCALE = 4;
const OUTLIER_OFFSET = 10;
/** Planted needles, and as many plain queries beside them in the output-error figures. */
const NEEDLES = 8;
const PLAIN_QUERIES = 8;
/** Exact-attention logit (score x scale) by which each needle beats every other token, for every query head. */
const NEEDLE_MARGIN = 2;
const ALPHA_STEP = 0.25;
const ALPHA_MAX = 16;
/** Largest multiple of 1/128 below 16: every such value is exact in f16. */
const GRID_MAX = 16 - 1 / 128;
const SEEDS = { keys: 11, values: 12, queries: 13 } as const;
/** The pre-RoPE rows' rotary embedding (Llama 2's): the outlier workload's keys are the pre-RoPE keys. */
export const KIVI_ROPE = { theta: 10000, style: 'adjacent' } as const;

export interface KiviPlan {
  /** Decode rows: tokens in the cache. */
  timingTokens: number[];
  /** Quality section: tokens of the outlier workload. */
  qualityTokens: number;
}

/** The full section: decode at 4K-64K, quality at 16K; `quick`: decode and quality at 4K. */
export function kiviPlan(quick: boolean): KiviPlan {
  return quick ? { timingTokens: [4096], qualityTokens: 4096 } : { timingTokens: [4096, 16384, 32768, 65536], qualityTokens: 16384 };
}

export interface KiviDecodeRow {
  /** kivi-<bits>-<T>, or kivi-f16-<T> for the f16 cache the row is compared with. */
  id: string;
  store: 'f16' | 'kivi';
  bits: 16 | KiviBits;
  tokens: number;
  status: 'ok' | 'FAILED' | 'ERROR';
  error?: string;
  /** Output vs exact f32 attention; failed rows are not timed. */
  check?: { relL2Error: number; tolerance: number; passed: boolean };
  /** Milliseconds to append the T tokens (chunks of APPEND_CHUNK_TOKENS), quantization included. */
  fillMs?: number;
  time?: TimeStats;
  /** From cache.stats(): packed quantized bytes, f16 residual bytes, the plain f16 size. */
  bytes?: { kv: number; residual: number; fullF16: number };
  /** kv + residual: what a decode step reads. */
  bytesRead?: number;
  gbPerSecond?: number;
  bandwidthFraction?: number;
  /** 4 x qHeads x headDim x T. */
  flops?: number;
  gflopsPerSecond?: number;
  peakFraction?: number;
  /** Median time of the f16 row of the same T over this row's. */
  speedupOverF16?: number | null;
  /** fullF16 / (kv + residual). */
  compression?: number;
}

export interface KiviHeadToHead {
  /** Relative L2 of the output vs exact f32 attention, over all query rows. */
  relL2Error: number;
  /** Mean over (query row, query head) of the cosine between output and exact output. */
  cosine: number;
  needleHits: number;
  needlePairs: number;
  hitRate: number;
}

export interface KiviQualityRow {
  id: string;
  bits: KiviBits;
  /** Dense-and-sparse rows: policy.store.outliers (absent on the plain KIVI rows). */
  outliers?: number;
  /**
   * RoPE rows (KIVI_ROPE over the outlier workload): true, the store quantizes the pre-RoPE keys
   * (policy.store.preRope); false, plain KIVI over the post-RoPE keys. Absent on the other rows.
   */
  preRope?: boolean;
  status: 'ok' | 'FAILED' | 'ERROR';
  error?: string;
  /** The cache's attend() output vs attention() over the K and V rebuilt with quantize()/dequantize(). */
  mirror?: { relL2Error: number; tolerance: number; passed: boolean };
  /** The KIVI store (keys per channel): its attend() output; hits on its dequantized keys. */
  perChannel?: KiviHeadToHead;
  /** Ablation, keys per token (groups of `group` channels), values as the store holds them (plain rows only). */
  perToken?: KiviHeadToHead;
  /** perToken.relL2Error / perChannel.relL2Error. */
  errorRatio?: number;
}

export interface KiviRecord {
  config: {
    bits: readonly KiviBits[]; group: number; residual: number; appendChunkTokens: number;
    timing: TimingPlan; coldCache: string; sanity: Record<KiviBits, number>; f16Tolerance: number; mirrorTolerance: number;
  };
  plan: KiviPlan;
  decode: KiviDecodeRow[];
  quality: {
    workload: {
      tokens: number; data: string; outlierChannels: Array<{ kvHead: number; channels: number[] }>;
      outlier: string; needles: Array<{ position: number; alpha: number[] }>; needleMargin: number;
      plainQueries: number; verifyRounds: number;
    };
    /** Needle hits under the exact keys: 100% by construction. */
    exact: { needleHits: number; needlePairs: number; hitRate: number };
    rows: KiviQualityRow[];
    /** Needle hits of exact attention over the post-RoPE keys (the RoPE rows' baseline). */
    ropeExact?: { needleHits: number; needlePairs: number; hitRate: number };
  };
  durationMs: number;
  reproduce: string;
}

export interface KiviContext {
  quick: boolean;
  /** K and V `[>= max T, kvHeads, headDim]` (the decode section's data). */
  k: Float32Array;
  v: Float32Array;
  limits: MachineLimits;
  plan: TimingPlan;
  reproduce: string;
  say: (text?: string) => void;
  status: (text: string) => void;
}

const GB = 1e9;
const HEAD_GROUP = MODEL.qHeads / MODEL.kvHeads;
const SCALE = 1 / Math.sqrt(MODEL.headDim);

export const kiviDecodeTable = new Table([
  { title: 'case', width: 14, left: true }, { title: 'rel.err', width: 7 }, { title: 'ms', width: 6 },
  { title: 'spread ms', width: 13 }, { title: 'runs', width: 4 }, { title: 'read MB', width: 7 },
  { title: 'GB/s', width: 5 }, { title: 'x BW', width: 4 }, { title: 'GFLOP/s', width: 7 }, { title: 'x peak', width: 6 },
  { title: 'vs f16', width: 6 }, { title: 'f16/read', width: 8 },
]);

export const kiviQualityTable = new Table([
  { title: 'store', width: 16, left: true }, { title: 'ch rel.L2', width: 9 }, { title: 'ch cos', width: 7 },
  { title: 'ch needle hits', width: 14 }, { title: 'tok rel.L2', width: 10 }, { title: 'tok cos', width: 7 },
  { title: 'tok needle hits', width: 15 }, { title: 'tok/ch', width: 6 }, { title: 'mirror', width: 7 },
]);

const DASH = '-';
const times = (value: number | null | undefined) =>
  value === null || value === undefined || !Number.isFinite(value) ? DASH : `${value >= 100 ? value.toFixed(0) : value.toFixed(2)}x`;
const exp = (value: number) => (Number.isFinite(value) ? value.toExponential(1) : String(value));
const hits = (h: KiviHeadToHead) => `${h.needleHits}/${h.needlePairs} ${(h.hitRate * 100).toFixed(1)}%`;
const storeName = (bits: 16 | KiviBits) => (bits === 16 ? 'f16' : `KIVI-${bits}`);

export function kiviDecodeLine(row: KiviDecodeRow): string {
  const error = row.check === undefined ? (row.status === 'ERROR' ? 'ERROR' : DASH) : exp(row.check.relL2Error);
  const time = row.time;
  if (row.status !== 'ok' || time === undefined) {
    const why = row.status === 'FAILED' ? `FAILED: rel.err above ${row.check?.tolerance}, not timed` : `ERROR: ${row.error}`;
    return `${kiviDecodeTable.line([row.id, error])}  ${why}`;
  }
  return kiviDecodeTable.line([
    row.id, error, ms(time.medianMs), `${ms(time.spreadLowMs)}-${ms(time.spreadHighMs)}`, String(time.runs),
    num((row.bytesRead ?? 0) / 1e6), num(row.gbPerSecond), num(row.bandwidthFraction, 2), num(row.gflopsPerSecond, 0),
    num(row.peakFraction, 2), times(row.speedupOverF16), times(row.compression),
  ]);
}

export function kiviQualityLine(row: KiviQualityRow): string {
  const name = row.preRope !== undefined ? `${storeName(row.bits)} ${row.preRope ? 'pre-RoPE' : 'post-RoPE'}`
    : row.outliers === undefined ? storeName(row.bits) : `${storeName(row.bits)}+${row.outliers * 100}%`;
  if (row.status === 'ERROR' || row.perChannel === undefined ||
    (row.perToken === undefined && row.outliers === undefined && row.preRope === undefined)) {
    return `${kiviQualityTable.line([name])}  ERROR: ${row.error}`;
  }
  const line = kiviQualityTable.line([
    name, row.perChannel.relL2Error.toFixed(4), row.perChannel.cosine.toFixed(4), hits(row.perChannel),
    row.perToken === undefined ? DASH : row.perToken.relL2Error.toFixed(4), row.perToken === undefined ? DASH : row.perToken.cosine.toFixed(4),
    row.perToken === undefined ? DASH : hits(row.perToken), times(row.errorRatio),
    row.mirror === undefined ? DASH : exp(row.mirror.relL2Error),
  ]);
  return row.status === 'FAILED' ? `${line}  FAILED: cache output off its mirror by more than ${MIRROR_TOLERANCE}` : line;
}

function errorText(error: unknown): string {
  return (error instanceof Error ? `${error.name}: ${error.message}` : String(error)).split('\n')[0];
}

function newCache(bits: 16 | KiviBits, outliers = 0, preRope = false): KVCache {
  return new KVCache({
    layers: 1, qHeads: MODEL.qHeads, kvHeads: MODEL.kvHeads, headDim: MODEL.headDim, device: 'cpu',
    policy: { store: bits === 16 ? { kind: 'f16' } : { kind: 'kivi', bits, group: KIVI_GROUP, residual: KIVI_RESIDUAL, outliers, preRope } },
    ...(preRope ? { rope: KIVI_ROPE } : {}),
  });
}

/** Appends tokens [from, to) of k and v in chunks of APPEND_CHUNK_TOKENS aligned to absolute positions. */
function appendRange(cache: KVCache, k: Float32Array, v: Float32Array, from: number, to: number): void {
  for (let start = from; start < to;) {
    const end = Math.min(to, (Math.floor(start / APPEND_CHUNK_TOKENS) + 1) * APPEND_CHUNK_TOKENS);
    cache.append(0, k.subarray(start * TOKEN_STRIDE, end * TOKEN_STRIDE), v.subarray(start * TOKEN_STRIDE, end * TOKEN_STRIDE));
    start = end;
  }
}

/**
 * Decode timing: one f16 and one KIVI-8/4/2 cache, grown together through the T of the plan (the
 * state at T equals a fresh fill of T tokens in the same chunks: KIVI flushes at absolute multiples
 * of the residual). At each T every cache is checked against exact attention, then timed cold,
 * f16 first so the speed-ups compare runs of the same moment.
 */
function runDecodeRows(context: KiviContext, tokens: number[]): KiviDecodeRow[] {
  const { k, v, limits, plan, say, status } = context;
  const stores: Array<16 | KiviBits> = [16, ...KIVI_BITS];
  const caches = new Map<16 | KiviBits, { cache: KVCache | null; fillMs: number; error?: string }>();
  for (const bits of stores) {
    try {
      caches.set(bits, { cache: newCache(bits), fillMs: 0 });
    } catch (error) {
      caches.set(bits, { cache: null, fillMs: 0, error: errorText(error) });
    }
  }
  const rows: KiviDecodeRow[] = [];
  let filled = 0;
  try {
    for (const T of tokens) {
      const q = gridValues(QUERY_STRIDE, 1000 + T);
      const out = new Float32Array(QUERY_STRIDE);
      status(`KIVI decode ${tokenLabel(T)}: exact attention, appending...`);
      const exact = attention({
        q, k: k.subarray(0, T * TOKEN_STRIDE), v: v.subarray(0, T * TOKEN_STRIDE),
        qHeads: MODEL.qHeads, kvHeads: MODEL.kvHeads, headDim: MODEL.headDim,
      });
      let f16Ms: number | null = null;
      for (const bits of stores) {
        const entry = caches.get(bits)!;
        const row: KiviDecodeRow = {
          id: `kivi-${bits === 16 ? 'f16' : bits}-${tokenLabel(T)}`, store: bits === 16 ? 'f16' : 'kivi', bits, tokens: T, status: 'ok',
        };
        rows.push(row);
        if (entry.cache === null) {
          Object.assign(row, { status: 'ERROR', error: entry.error });
          say(kiviDecodeLine(row));
          continue;
        }
        try {
          status(`${row.id}: appending to ${tokenLabel(T)} tokens, checking, timing...`);
          const cache = entry.cache;
          entry.fillMs += elapsedMs(() => appendRange(cache, k, v, filled, T));
          row.fillMs = entry.fillMs;
          const relL2Error = relativeL2Error(cache.attend(0, q, { out }), exact);
          const tolerance = bits === 16 ? TOLERANCE : KIVI_SANITY[bits];
          row.check = { relL2Error, tolerance, passed: relL2Error <= tolerance };  // NaN fails too
          if (!row.check.passed) {
            row.status = 'FAILED';
          } else {
            row.time = measure(plan, () => {
              evictCaches();
              return elapsedMs(() => cache.attend(0, q, { out }));
            });
            const stats = cache.stats().bytes;
            const medianMs = row.time.medianMs;
            row.bytes = { kv: stats.kv, residual: stats.residual, fullF16: stats.fullF16 };
            row.bytesRead = stats.kv + stats.residual;
            row.gbPerSecond = row.bytesRead / (medianMs * 1e6);
            row.bandwidthFraction = (row.gbPerSecond * GB) / limits.readBytesPerSecond;
            row.flops = 4 * MODEL.qHeads * MODEL.headDim * T;
            row.gflopsPerSecond = row.flops / (medianMs * 1e6);
            row.peakFraction = (row.gflopsPerSecond * GB) / limits.fmaFlopsPerSecond;
            row.compression = stats.fullF16 / row.bytesRead;
            if (bits === 16) f16Ms = medianMs;
            row.speedupOverF16 = f16Ms === null ? null : f16Ms / medianMs;
          }
        } catch (error) {
          Object.assign(row, { status: 'ERROR', error: errorText(error) });
          entry.cache.dispose();
          entry.cache = null;
          entry.error = row.error;
        }
        say(kiviDecodeLine(row));
      }
      filled = T;
    }
  } finally {
    for (const entry of caches.values()) entry.cache?.dispose();
  }
  return rows;
}

/** Outlier channels of a kv head: one per 32-channel group, at a head-dependent offset. */
function outlierChannels(head: number): number[] {
  const groupWidth = MODEL.headDim / OUTLIER_CHANNELS;
  return Array.from({ length: OUTLIER_CHANNELS }, (_, j) => j * groupWidth + ((7 * head + 11 * j) % groupWidth));
}

/**
 * For each query row and query head: the token with the largest q.k over `tokens` keys
 * `[T, kvHeads, headDim]`, and that (unscaled) score. Plain JS, f64 accumulation; each key is read
 * once for the rows x group query heads that share its kv head.
 */
function topKeys(keys: Float32Array, tokens: number, queries: Float32Array, rows: number): { index: Int32Array; score: Float64Array } {
  const D = MODEL.headDim;
  const index = new Int32Array(rows * MODEL.qHeads);
  const score = new Float64Array(rows * MODEL.qHeads).fill(-Infinity);
  const vectors = rows * HEAD_GROUP;
  const local = new Float32Array(vectors * D);
  const best = new Float64Array(vectors);
  const arg = new Int32Array(vectors);
  for (let h = 0; h < MODEL.kvHeads; h++) {
    for (let r = 0; r < rows; r++) {
      for (let j = 0; j < HEAD_GROUP; j++) {
        const head = h * HEAD_GROUP + j;
        local.set(queries.subarray((r * MODEL.qHeads + head) * D, (r * MODEL.qHeads + head + 1) * D), (r * HEAD_GROUP + j) * D);
      }
    }
    best.fill(-Infinity);
    for (let t = 0; t < tokens; t++) {
      const ko = t * TOKEN_STRIDE + h * D;
      for (let i = 0; i < vectors; i++) {
        const qo = i * D;
        let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (let d = 0; d < D; d += 4) {
          s0 += local[qo + d] * keys[ko + d];
          s1 += local[qo + d + 1] * keys[ko + d + 1];
          s2 += local[qo + d + 2] * keys[ko + d + 2];
          s3 += local[qo + d + 3] * keys[ko + d + 3];
        }
        const s = s0 + s1 + (s2 + s3);
        if (s > best[i]) {
          best[i] = s;
          arg[i] = t;
        }
      }
    }
    for (let r = 0; r < rows; r++) {
      for (let j = 0; j < HEAD_GROUP; j++) {
        index[r * MODEL.qHeads + h * HEAD_GROUP + j] = arg[r * HEAD_GROUP + j];
        score[r * MODEL.qHeads + h * HEAD_GROUP + j] = best[r * HEAD_GROUP + j];
      }
    }
  }
  return { index, score };
}

function countHits(keys: Float32Array, tokens: number, queries: Float32Array, positions: number[]): { needleHits: number; misses: Array<[number, number]> } {
  const { index } = topKeys(keys, tokens, queries, positions.length);
  const misses: Array<[number, number]> = [];
  positions.forEach((position, n) => {
    for (let head = 0; head < MODEL.qHeads; head++) if (index[n * MODEL.qHeads + head] !== position) misses.push([n, head]);
  });
  return { needleHits: positions.length * MODEL.qHeads - misses.length, misses };
}

/** Mean over (row, query head) of cos(actual, expected). */
function meanCosine(actual: Float32Array, expected: Float32Array): number {
  const D = MODEL.headDim;
  let total = 0;
  const vectors = expected.length / D;
  for (let i = 0; i < vectors; i++) {
    let dot = 0, aa = 0, ee = 0;
    for (let d = i * D; d < (i + 1) * D; d++) {
      dot += actual[d] * expected[d];
      aa += actual[d] * actual[d];
      ee += expected[d] * expected[d];
    }
    total += dot / Math.sqrt(aa * ee);
  }
  return total / vectors;
}

/**
 * The outlier workload: keys are grid values with, per kv head, OUTLIER_CHANNELS channels scaled by
 * OUTLIER_SCALE and offset by +/-OUTLIER_OFFSET (multiples of 1/32 in (-18, 18): exact in f16);
 * values are grid values. NEEDLES needles at spread positions older than the residual window: the
 * needle token's key in kv head h moves by alpha x (mean of the needle query over h's query heads)
 * on the ordinary channels, rounded to multiples of 1/128 within +/-16 (exact in f16), alpha the
 * smallest multiple of ALPHA_STEP with which exact attention gives the needle a logit at least
 * NEEDLE_MARGIN above every other token for each of h's query heads. With `rope`, the keys are
 * pre-RoPE and the margin holds after RoPE (KIVI_ROPE): keys turned by their positions, each needle
 * query by its needle's position (the needle's own logit is then the pre-RoPE one).
 */
function outlierWorkload(tokens: number, status: (text: string) => void, rope = false) {
  const D = MODEL.headDim;
  const k = gridValues(tokens * TOKEN_STRIDE, SEEDS.keys);
  const v = gridValues(tokens * TOKEN_STRIDE, SEEDS.values);
  const q = gridValues((NEEDLES + PLAIN_QUERIES) * QUERY_STRIDE, SEEDS.queries);
  const outliers = Array.from({ length: MODEL.kvHeads }, (_, h) => outlierChannels(h));
  for (let h = 0; h < MODEL.kvHeads; h++) {
    outliers[h].forEach((c, j) => {
      const offset = j % 2 === 0 ? OUTLIER_OFFSET : -OUTLIER_OFFSET;
      for (let t = 0; t < tokens; t++) {
        const i = t * TOKEN_STRIDE + h * D + c;
        k[i] = OUTLIER_SCALE * k[i] + offset;
      }
    });
  }
  const positions = Array.from({ length: NEEDLES }, (_, n) => Math.floor(((n + 0.5) * (tokens - KIVI_RESIDUAL)) / NEEDLES));
  const needleQueries = q.subarray(0, NEEDLES * QUERY_STRIDE);
  const base = k.slice();
  // Direction of needle n in kv head h: the mean of the needle query over h's query heads.
  const direction = (n: number, h: number): Float64Array => {
    const u = new Float64Array(D);
    for (let j = 0; j < HEAD_GROUP; j++) {
      const qo = (n * MODEL.qHeads + h * HEAD_GROUP + j) * D;
      for (let c = 0; c < D; c++) u[c] += q[qo + c] / HEAD_GROUP;
    }
    return u;
  };
  const needleKey = (n: number, h: number, alpha: number): Float32Array => {
    const key = base.slice(positions[n] * TOKEN_STRIDE + h * D, positions[n] * TOKEN_STRIDE + (h + 1) * D);
    const u = direction(n, h);
    for (let c = 0; c < D; c++) {
      if (outliers[h].includes(c)) continue;
      key[c] = Math.min(GRID_MAX, Math.max(-GRID_MAX, Math.round((key[c] + alpha * u[c]) * 128) / 128));
    }
    return key;
  };
  const plant = (n: number, h: number, alpha: number) => k.set(needleKey(n, h, alpha), positions[n] * TOKEN_STRIDE + h * D);
  // Keys and needle queries as the scores see them (post-RoPE with `rope`).
  const seen = (keys: Float32Array) => (rope ? ropeRows(keys, tokens, MODEL.kvHeads, TOKEN_STRIDE, (t) => t) : keys);
  const seenQueries = rope ? ropeRows(needleQueries, NEEDLES, MODEL.qHeads, QUERY_STRIDE, (r) => positions[r]) : needleQueries;

  // The best other score of each (needle, query head) over the unplanted keys (conservative: the
  // needle's own base key counts as a competitor), then the smallest alpha that clears the margin.
  status(`KIVI quality: planting ${NEEDLES} needles in ${tokenLabel(tokens)} tokens...`);
  const competitors = topKeys(seen(base), tokens, seenQueries, NEEDLES).score;
  const alpha = positions.map(() => new Array<number>(MODEL.kvHeads).fill(0));
  for (let n = 0; n < NEEDLES; n++) {
    for (let h = 0; h < MODEL.kvHeads; h++) {
      let a = ALPHA_STEP;
      for (; a < ALPHA_MAX; a += ALPHA_STEP) {
        const key = needleKey(n, h, a);
        let clears = true;
        for (let j = 0; j < HEAD_GROUP && clears; j++) {
          const head = h * HEAD_GROUP + j;
          const qo = (n * MODEL.qHeads + head) * D;
          let s = 0;
          for (let c = 0; c < D; c++) s += q[qo + c] * key[c];
          clears = (s - competitors[n * MODEL.qHeads + head]) * SCALE >= NEEDLE_MARGIN;
        }
        if (clears) break;
      }
      alpha[n][h] = a;
      plant(n, h, a);
    }
  }
  // The other needles are competitors too: raise alpha where one of them (or rounding) wins.
  let exact = countHits(seen(k), tokens, seenQueries, positions);
  let verifyRounds = 1;
  while (exact.misses.length > 0 && verifyRounds < 8) {
    const raise = new Set(exact.misses.map(([n, head]) => `${n}:${Math.floor(head / HEAD_GROUP)}`));
    for (const key of raise) {
      const [n, h] = key.split(':').map(Number);
      alpha[n][h] = Math.min(ALPHA_MAX, alpha[n][h] + ALPHA_STEP);
      plant(n, h, alpha[n][h]);
    }
    exact = countHits(seen(k), tokens, seenQueries, positions);
    verifyRounds++;
  }
  return { k, v, q, needleQueries, positions, alpha, outliers, exactHits: exact.needleHits, verifyRounds };
}

/**
 * Tokens of a T-token KIVI cache whose keys (floor(T/R)*R) and values (max(0, T-R)) are quantized;
 * the rest are the f16 residual.
 */
function quantizedTokens(tokens: number) {
  return { keyTokens: Math.floor(tokens / KIVI_RESIDUAL) * KIVI_RESIDUAL, valueTokens: Math.max(0, tokens - KIVI_RESIDUAL) };
}

/** A copy of [tokens, kvHeads, headDim] rows with each kv head's first `count` tokens replaced by roundTrip of them ([count, headDim]). */
function perHead(source: Float32Array, count: number, roundTrip: (rows: Float32Array) => Float32Array): Float32Array {
  const D = MODEL.headDim;
  const out = source.slice();
  const head = new Float32Array(count * D);
  for (let h = 0; h < MODEL.kvHeads && count > 0; h++) {
    for (let t = 0; t < count; t++) for (let d = 0; d < D; d++) head[t * D + d] = source[t * TOKEN_STRIDE + h * D + d];
    const rows = roundTrip(head);
    for (let t = 0; t < count; t++) for (let d = 0; d < D; d++) out[t * TOKEN_STRIDE + h * D + d] = rows[t * D + d];
  }
  return out;
}

/**
 * What a KIVI cache of T tokens holds (the store's rules), rebuilt with quantize()/dequantize() per
 * kv head: keys of the first floor(T/R)*R tokens per channel (or, for the ablation, per token in
 * groups of `group` channels), values of the first max(0, T-R) tokens per token; the rest as
 * appended (the data are exact in f16).
 */
function rebuild(k: Float32Array, v: Float32Array, tokens: number, bits: KiviBits) {
  const { keyTokens, valueTokens } = quantizedTokens(tokens);
  const roundTrip = (axis: 'channel' | 'token') => (x: Float32Array) =>
    dequantize(quantize({ x, channels: MODEL.headDim, axis, bits, group: KIVI_GROUP }));
  return {
    perChannel: perHead(k, keyTokens, roundTrip('channel')),
    perToken: perHead(k, keyTokens, roundTrip('token')),
    values: perHead(v, valueTokens, roundTrip('token')),
  };
}

/** float32 -> nearest binary16 (ties to even), as a number. */
function f16Round(x: number): number {
  if (x === 0 || !Number.isFinite(x)) return x;
  const a = Math.abs(x);
  if (a >= 65520) return Math.sign(x) * Infinity;
  let e = Math.floor(Math.log2(a));
  if (2 ** e > a) e--;
  if (2 ** (e + 1) <= a) e++;
  const ulp = 2 ** (Math.max(e, -14) - 10);
  const q = a / ulp;
  let r = Math.round(q);
  if (r - q === 0.5 && r % 2 === 1) r--;
  return Math.sign(x) * r * ulp;
}

/**
 * quantize()/dequantize() ignore outliers, so the dense-and-sparse rebuild does the rest here, by
 * the store's rule (native/core/kivi_format.h): per record of `recordSize` entries (a key group:
 * KIVI_GROUP tokens x headDim; a value token: headDim) the `count` largest |x| (ties: lower index)
 * are outliers. Each outlier is replaced by an inlier of its quantization group (which leaves the
 * group's min and max those of its inliers) before quantize(); x^ at an outlier is then recomputed
 * from its clamped code, and x^ + f16(x - x^) is what the store reads there.
 */
function sparseRoundTrip(x: Float32Array, axis: 'channel' | 'token', bits: KiviBits, fraction: number): Float32Array {
  const D = MODEL.headDim;
  const recordSize = axis === 'channel' ? KIVI_GROUP * D : D;
  const count = Math.round(fraction * recordSize);
  const modified = x.slice();
  const outliers: number[] = [];
  // The quantization group of flat position i (tokens x D): a (block, channel) or a (token, channel group).
  const groupOf = (i: number) => axis === 'channel'
    ? Math.floor(i / recordSize) * D + (i % D)
    : Math.floor(i / D) * (D / KIVI_GROUP) + Math.floor((i % D) / KIVI_GROUP);
  const order = Array.from({ length: recordSize }, (_, i) => i);
  for (let first = 0; first < x.length; first += recordSize) {
    order.sort((a, b) => Math.abs(x[first + b]) - Math.abs(x[first + a]) || a - b);
    const picked = new Set(order.slice(0, count));
    const inlier = new Map<number, number>();
    for (let i = 0; i < recordSize; i++) if (!picked.has(i)) inlier.set(groupOf(first + i), x[first + i]);
    for (const i of picked) {
      outliers.push(first + i);
      const stand = inlier.get(groupOf(first + i));
      if (stand !== undefined) modified[first + i] = stand;  // a group of only outliers keeps them all
    }
  }
  const q = quantize({ x: modified, channels: D, axis, bits, group: KIVI_GROUP });
  const out = dequantize(q);
  const top = 2 ** bits - 1;
  for (const i of outliers) {
    const s = q.scales[groupOf(i)], z = q.zeros[groupOf(i)];
    const code = Math.min(top, Math.max(0, Math.round(Math.fround(Math.fround(x[i] - z) / s))));
    const xHat = Math.fround(Math.fround(code * s) + z);
    out[i] = xHat + f16Round(Math.fround(x[i] - xHat));
  }
  return out;
}

/** rebuild() for a dense-and-sparse store: keys per channel and values per token, with outliers. */
function rebuildSparse(k: Float32Array, v: Float32Array, tokens: number, bits: KiviBits, fraction: number) {
  const { keyTokens, valueTokens } = quantizedTokens(tokens);
  return {
    keys: perHead(k, keyTokens, (x) => sparseRoundTrip(x, 'channel', bits, fraction)),
    values: perHead(v, valueTokens, (x) => sparseRoundTrip(x, 'token', bits, fraction)),
  };
}

/**
 * RoPE (KIVI_ROPE, adjacent pairs) of rows [rows, heads, headDim] with stride `stride` floats per
 * row: row r turns pair i by position(r) * theta^(-2i/headDim), in float64 (a copy).
 */
function ropeRows(x: Float32Array, rows: number, heads: number, stride: number, position: (row: number) => number): Float32Array {
  const D = MODEL.headDim;
  const out = x.slice();
  const frequencies = Array.from({ length: D / 2 }, (_, i) => Math.pow(KIVI_ROPE.theta, (-2 * i) / D));
  for (let r = 0; r < rows; r++) {
    const p = position(r);
    for (let i = 0; i < D / 2; i++) {
      const c = Math.cos(p * frequencies[i]), s = Math.sin(p * frequencies[i]);
      for (let h = 0; h < heads; h++) {
        const a = r * stride + h * D + 2 * i;
        const xa = out[a], xb = out[a + 1];
        out[a] = xa * c - xb * s;
        out[a + 1] = xa * s + xb * c;
      }
    }
  }
  return out;
}

/**
 * The RoPE rows: the outlier workload (needles planted for the post-RoPE scores) taken as PRE-RoPE keys (outliers in fixed
 * channels) and rotated by their positions (KIVI_ROPE) into the post-RoPE keys a model attends
 * with; rotation mixes each outlier channel with its pair partner, so the outliers move between
 * two channels from token to token. Queries are post-RoPE: a needle query turned by its needle's
 * position (the needle keeps its exact logit), a plain query by T. Both rows are compared with
 * exact attention over the post-RoPE keys: plain KIVI-b quantizes the post-RoPE keys,
 * KIVI-b pre-RoPE (policy.store.preRope) the pre-RoPE ones and rotates in attention.
 */
function runPreRopeRows(context: KiviContext, tokens: number) {
  const { say, status } = context;
  const w = outlierWorkload(tokens, status, true);
  const heads = { qHeads: MODEL.qHeads, kvHeads: MODEL.kvHeads, headDim: MODEL.headDim };
  const rowsOfQ = NEEDLES + PLAIN_QUERIES;
  const needlePairs = NEEDLES * MODEL.qHeads;
  status('KIVI RoPE quality: rotating keys and queries...');
  // Post-RoPE keys in f16 (what a cache holds of them), so the rebuilt mirror matches the store.
  const kPost = ropeRows(w.k, tokens, MODEL.kvHeads, TOKEN_STRIDE, (t) => t).map(f16Round);
  const q = ropeRows(w.q, rowsOfQ, MODEL.qHeads, QUERY_STRIDE, (r) => (r < NEEDLES ? w.positions[r] : tokens));
  const needleQueries = q.subarray(0, NEEDLES * QUERY_STRIDE);
  const exactOut = attention({ q, k: kPost, v: w.v, ...heads, causal: false });
  const exactHits = countHits(kPost, tokens, needleQueries, w.positions).needleHits;
  const ropeExact = { needleHits: exactHits, needlePairs, hitRate: exactHits / needlePairs };
  say(`KIVI RoPE rows: the workload's keys (needles re-planted for post-RoPE scores) taken as pre-RoPE and rotated (theta ${KIVI_ROPE.theta}, ${KIVI_ROPE.style}); post-RoPE = plain KIVI ` +
    `over the rotated keys, pre-RoPE = policy.store.preRope; both vs exact attention over the rotated keys, whose needle hits are ` +
    `${exactHits}/${needlePairs}; tok/ch on a pre-RoPE row = post-RoPE rel.L2 / pre-RoPE rel.L2 (above 1: pre-RoPE helps).`);
  const rows: KiviQualityRow[] = [];
  for (const bits of [...KIVI_BITS]) {
    const byMode: Partial<Record<'post' | 'pre', KiviQualityRow>> = {};
    for (const preRope of [false, true]) {
      const row: KiviQualityRow = { id: `kivi-quality-${bits}-${preRope ? 'prerope' : 'postrope'}`, bits, preRope, status: 'ok' };
      rows.push(row);
      byMode[preRope ? 'pre' : 'post'] = row;
      let cache: KVCache | null = null;
      try {
        status(`KIVI-${bits} ${preRope ? 'pre' : 'post'}-RoPE quality: appending, attending, rebuilding K and V, scoring needles...`);
        cache = newCache(bits, 0, preRope);
        appendRange(cache, preRope ? w.k : kPost, w.v, 0, tokens);
        const out = new Float32Array(q.length);
        for (let r = 0; r < rowsOfQ; r++) {
          cache.attend(0, q.subarray(r * QUERY_STRIDE, (r + 1) * QUERY_STRIDE), { out: out.subarray(r * QUERY_STRIDE, (r + 1) * QUERY_STRIDE) });
        }
        // The keys as the cache holds them, post-RoPE (pre-RoPE rows: dequantized, then rotated).
        const held = rebuild(preRope ? w.k : kPost, w.v, tokens, bits);
        const keys = preRope ? ropeRows(held.perChannel, tokens, MODEL.kvHeads, TOKEN_STRIDE, (t) => t) : held.perChannel;
        const mirrorError = relativeL2Error(out, attention({ q, k: keys, v: held.values, ...heads, causal: false }));
        row.mirror = { relL2Error: mirrorError, tolerance: MIRROR_TOLERANCE, passed: mirrorError <= MIRROR_TOLERANCE };
        if (!row.mirror.passed) row.status = 'FAILED';
        const { needleHits } = countHits(keys, tokens, needleQueries, w.positions);
        row.perChannel = {
          relL2Error: relativeL2Error(out, exactOut), cosine: meanCosine(out, exactOut), needleHits, needlePairs, hitRate: needleHits / needlePairs,
        };
      } catch (error) {
        Object.assign(row, { status: 'ERROR', error: errorText(error) });
      } finally {
        cache?.dispose();
      }
      if (preRope && byMode.post?.perChannel !== undefined && row.perChannel !== undefined) {
        row.errorRatio = byMode.post.perChannel.relL2Error / row.perChannel.relL2Error;
      }
      say(kiviQualityLine(row));
    }
  }
  return { rows, ropeExact };
}

function runQualityRows(context: KiviContext, tokens: number): KiviRecord['quality'] {
  const { say, status } = context;
  const w = outlierWorkload(tokens, status);
  const rowsOfQ = NEEDLES + PLAIN_QUERIES;
  const needlePairs = NEEDLES * MODEL.qHeads;
  const heads = { qHeads: MODEL.qHeads, kvHeads: MODEL.kvHeads, headDim: MODEL.headDim };
  // Every query row attends to all T tokens (causal: false; the cache's n = 1 attend() does the same).
  const exactOut = attention({ q: w.q, k: w.k, v: w.v, ...heads, causal: false });
  const exact = { needleHits: w.exactHits, needlePairs, hitRate: w.exactHits / needlePairs };
  const alphas = w.alpha.flat();
  say(`exact f32 attention: needle hits ${w.exactHits}/${needlePairs} (each needle >= ${NEEDLE_MARGIN} logits above every other token, ` +
    `alpha ${Math.min(...alphas)}-${Math.max(...alphas)}); needles at ${w.positions.join(', ')} of ${tokens}`);
  say(kiviQualityTable.header());
  const rows: KiviQualityRow[] = [];
  for (const bits of [...KIVI_BITS]) {
    const row: KiviQualityRow = { id: `kivi-quality-${bits}`, bits, status: 'ok' };
    rows.push(row);
    let cache: KVCache | null = null;
    try {
      status(`KIVI-${bits} quality: appending, attending, rebuilding K and V, scoring needles...`);
      cache = newCache(bits);
      appendRange(cache, w.k, w.v, 0, tokens);
      const out = new Float32Array(w.q.length);
      for (let r = 0; r < rowsOfQ; r++) {
        cache.attend(0, w.q.subarray(r * QUERY_STRIDE, (r + 1) * QUERY_STRIDE), { out: out.subarray(r * QUERY_STRIDE, (r + 1) * QUERY_STRIDE) });
      }
      const held = rebuild(w.k, w.v, tokens, bits);
      const mirrorOut = attention({ q: w.q, k: held.perChannel, v: held.values, ...heads, causal: false });
      const mirrorError = relativeL2Error(out, mirrorOut);
      row.mirror = { relL2Error: mirrorError, tolerance: MIRROR_TOLERANCE, passed: mirrorError <= MIRROR_TOLERANCE };
      if (!row.mirror.passed) row.status = 'FAILED';
      const ablationOut = attention({ q: w.q, k: held.perToken, v: held.values, ...heads, causal: false });
      const figures = (output: Float32Array, keys: Float32Array): KiviHeadToHead => {
        const { needleHits } = countHits(keys, tokens, w.needleQueries, w.positions);
        return {
          relL2Error: relativeL2Error(output, exactOut), cosine: meanCosine(output, exactOut),
          needleHits, needlePairs, hitRate: needleHits / needlePairs,
        };
      };
      row.perChannel = figures(out, held.perChannel);
      row.perToken = figures(ablationOut, held.perToken);
      row.errorRatio = row.perToken.relL2Error / row.perChannel.relL2Error;
    } catch (error) {
      Object.assign(row, { status: 'ERROR', error: errorText(error) });
    } finally {
      cache?.dispose();
    }
    say(kiviQualityLine(row));

    // Keys per channel + dense-and-sparse: does keeping 1% of each vector exact help on this workload?
    const sparse: KiviQualityRow = { id: `kivi-quality-${bits}-outliers`, bits, outliers: KIVI_OUTLIER_FRACTION, status: 'ok' };
    rows.push(sparse);
    cache = null;
    try {
      status(`KIVI-${bits} + ${KIVI_OUTLIER_FRACTION * 100}% outliers quality: appending, attending, rebuilding K and V, scoring needles...`);
      cache = newCache(bits, KIVI_OUTLIER_FRACTION);
      appendRange(cache, w.k, w.v, 0, tokens);
      const out = new Float32Array(w.q.length);
      for (let r = 0; r < rowsOfQ; r++) {
        cache.attend(0, w.q.subarray(r * QUERY_STRIDE, (r + 1) * QUERY_STRIDE), { out: out.subarray(r * QUERY_STRIDE, (r + 1) * QUERY_STRIDE) });
      }
      const held = rebuildSparse(w.k, w.v, tokens, bits, KIVI_OUTLIER_FRACTION);
      const mirrorError = relativeL2Error(out, attention({ q: w.q, k: held.keys, v: held.values, ...heads, causal: false }));
      sparse.mirror = { relL2Error: mirrorError, tolerance: MIRROR_TOLERANCE, passed: mirrorError <= MIRROR_TOLERANCE };
      if (!sparse.mirror.passed) sparse.status = 'FAILED';
      const { needleHits } = countHits(held.keys, tokens, w.needleQueries, w.positions);
      sparse.perChannel = {
        relL2Error: relativeL2Error(out, exactOut), cosine: meanCosine(out, exactOut), needleHits, needlePairs, hitRate: needleHits / needlePairs,
      };
      // tok/ch here: the plain store's rel.L2 / this row's (above 1: the outliers help).
      if (row.perChannel !== undefined) sparse.errorRatio = row.perChannel.relL2Error / sparse.perChannel.relL2Error;
    } catch (error) {
      Object.assign(sparse, { status: 'ERROR', error: errorText(error) });
    } finally {
      cache?.dispose();
    }
    say(kiviQualityLine(sparse));
  }
  const rope = runPreRopeRows(context, tokens);
  rows.push(...rope.rows);
  const workload: KiviRecord['quality']['workload'] = {
    tokens,
    data: `keys seed ${SEEDS.keys}, values seed ${SEEDS.values}, queries seed ${SEEDS.queries} (rows 0-${NEEDLES - 1} needle queries, ` +
      `${NEEDLES}-${rowsOfQ - 1} plain); grid values, multiples of 1/128 in [-2, 2)`,
    outlierChannels: w.outliers.map((channels, kvHead) => ({ kvHead, channels })),
    outlier: `key x ${OUTLIER_SCALE} + ${OUTLIER_OFFSET} (first and third outlier channel) or - ${OUTLIER_OFFSET} (second, fourth)`,
    needles: w.positions.map((position, n) => ({ position, alpha: w.alpha[n] })),
    needleMargin: NEEDLE_MARGIN,
    plainQueries: PLAIN_QUERIES,
    verifyRounds: w.verifyRounds,
  };
  return { workload, exact, rows, ropeExact: rope.ropeExact };
}

/** Runs the section, printing its tables as rows complete. */
export function runKivi(context: KiviContext): KiviRecord {
  const startedAt = Date.now();
  const { say } = context;
  const plan = kiviPlan(context.quick);
  say();
  say(`KIVI decode: group ${KIVI_GROUP}, residual ${KIVI_RESIDUAL}; one query over T tokens; read = packed codes + scales/mins + f16 residual ` +
    `(cache.stats()); vs f16 = the f16 cache of the same T, timed in this section.`);
  say(kiviDecodeTable.header());
  const decode = runDecodeRows(context, plan.timingTokens);
  const largest = Math.max(...plan.timingTokens);
  const f16Row = decode.find((r) => r.tokens === largest && r.bits === 16 && r.status === 'ok');
  const kivi2Row = decode.find((r) => r.tokens === largest && r.bits === 2 && r.status === 'ok');
  if (f16Row?.time && kivi2Row?.time && kivi2Row.bytesRead && f16Row.bytesRead) {
    say(`  at ${tokenLabel(largest)}: KIVI-2 reads ${(kivi2Row.bytesRead / f16Row.bytesRead).toFixed(2)} of the f16 bytes and takes ` +
      `${(kivi2Row.time.medianMs / f16Row.time.medianMs).toFixed(2)} of its time, at ${num(kivi2Row.bandwidthFraction, 2)} of the bandwidth ` +
      `and ${num(kivi2Row.peakFraction, 2)} of the FMA peak (f16: ${num(f16Row.bandwidthFraction, 2)}, ${num(f16Row.peakFraction, 2)}).`);
  }
  say();
  say(`KIVI quality: ${tokenLabel(plan.qualityTokens)} tokens, keys with ${OUTLIER_CHANNELS} outlier channels per kv head ` +
    `(x${OUTLIER_SCALE}, +/-${OUTLIER_OFFSET}), ${NEEDLES} needle + ${PLAIN_QUERIES} plain queries; ` +
    `ch = keys per channel (the store: its attend() output), tok = keys per token (ablation, same values).`);
  const quality = runQualityRows(context, plan.qualityTokens);
  return {
    config: {
      bits: KIVI_BITS, group: KIVI_GROUP, residual: KIVI_RESIDUAL, appendChunkTokens: APPEND_CHUNK_TOKENS,
      timing: context.plan, coldCache: `${EVICT_BYTES} bytes read between runs, then the thread pool woken`, sanity: KIVI_SANITY, f16Tolerance: TOLERANCE,
      mirrorTolerance: MIRROR_TOLERANCE,
    },
    plan,
    decode,
    quality,
    durationMs: Date.now() - startedAt,
    reproduce: context.reproduce,
  };
}

/** The KIVI targets, reported, not asserted. */
export function kiviTargets(record: KiviRecord | null): TargetResult[] {
  const targets: TargetResult[] = [];
  const decode = record?.decode ?? [];
  for (const T of [32768, 65536]) {
    const id = `kivi-2-${tokenLabel(T)}`;
    const row = decode.find((r) => r.id === id);
    const value = row?.speedupOverF16 ?? null;
    targets.push({
      name: `KIVI-2 decode ${tokenLabel(T)}: speed-up over the f16 cache`, caseId: id, value, target: 4.5, unit: 'x',
      verdict: row === undefined ? 'not measured' : row.status !== 'ok' ? row.status : value === null ? 'not measured' : value >= 4.5 ? 'met' : 'not met',
    });
  }
  const quantized = decode.filter((r) => r.store === 'kivi');
  const broken = quantized.find((r): r is KiviDecodeRow & { status: 'FAILED' | 'ERROR' } => r.status !== 'ok');
  const timed = quantized.filter((r) => r.status === 'ok' && r.bandwidthFraction !== undefined);
  const worst = timed.reduce<KiviDecodeRow | undefined>((a, r) => (a === undefined || r.bandwidthFraction! < a.bandwidthFraction! ? r : a), undefined);
  const fraction = worst?.bandwidthFraction ?? null;
  targets.push({
    name: 'KIVI decodes: min fraction of bandwidth on bytes read', caseId: broken?.id ?? worst?.id ?? 'kivi-*', value: fraction, target: 0.8,
    unit: 'fraction',
    // A fraction above 1 beats the measured limit: the probe read low, so the fraction proves nothing.
    verdict: broken !== undefined ? broken.status : fraction === null ? 'not measured' : fraction > 1 ? 'suspect' : fraction >= 0.8 ? 'met' : 'not met',
  });
  const quality = record?.quality.rows ?? [];
  for (const bits of KIVI_BITS) {
    const row = quality.find((r) => r.bits === bits && r.outliers === undefined && r.preRope === undefined);
    const target = bits === 2 ? 0.99 : 1;
    const value = row?.perChannel?.hitRate ?? null;
    targets.push({
      name: `KIVI-${bits} outlier keys: needle hit rate`, caseId: `kivi-quality-${bits}`, value, target, unit: 'percent',
      verdict: row === undefined ? 'not measured' : row.status !== 'ok' ? row.status : value === null ? 'not measured' : value >= target ? 'met' : 'not met',
    });
  }
  for (const bits of KIVI_BITS) {
    const row = quality.find((r) => r.bits === bits && r.outliers === undefined && r.preRope === undefined);
    const value = row?.errorRatio ?? null;
    targets.push({
      name: `KIVI-${bits} outlier keys: rel.L2 per-token / per-channel`, caseId: `kivi-quality-${bits}`, value, target: 1, unit: 'x',
      verdict: row === undefined ? 'not measured' : row.status !== 'ok' ? row.status : value === null ? 'not measured' : value > 1 ? 'met' : 'not met',
    });
  }
  return targets;
}

/** Rows of the section that failed their check or threw. */
export function kiviFailures(record: KiviRecord | null): string[] {
  if (record === null) return [];
  return [...record.decode, ...record.quality.rows].filter((r) => r.status !== 'ok').map((r) => `${r.id} (${r.status})`);
}

/** Decode rows above the probed bandwidth or FMA peak. */
export function kiviAboveLimit(record: KiviRecord | null): string[] {
  return (record?.decode ?? []).filter((r) => (r.bandwidthFraction ?? 0) > 1 || (r.peakFraction ?? 0) > 1).map((r) => r.id);
}

export function kiviNotes(record: KiviRecord): string[] {
  return [
    `KIVI decode: read MB = stats bytes.kv (packed codes, f16 scales and mins) + bytes.residual (f16 keys since the last multiple of ` +
      `${KIVI_RESIDUAL} tokens, the last ${KIVI_RESIDUAL} values); x BW = GB/s on those bytes / measured bandwidth; f16/read = compression vs f16.`,
    `KIVI decode rel.err = relative L2 vs exact f32 attention(), a sanity bound (f16 ${TOLERANCE}; KIVI-8/4/2 ${KIVI_SANITY[8]}/${KIVI_SANITY[4]}/${KIVI_SANITY[2]}) ` +
      `on uniform data, the worst case for min-max quantization; above it the row is FAILED, not timed. Timing as the decode section (cold).`,
    `KIVI decode x peak = 4 x qHeads x headDim x T FLOPs per step / measured FMA peak. A KIVI step does the f16 step's multiply-adds ` +
      `plus unpacking every code, so with x BW and x peak both well below 1 its time is set by instruction throughput, not by the ` +
      `bytes it reads; the 4.5x target presumes a bandwidth-bound decode (a GPU, or a CPU with many cores per memory channel).`,
    `KIVI quality: rel.L2 over ${NEEDLES + PLAIN_QUERIES} query rows vs exact f32 attention(); cos = mean over (row, head). Needle hits = ` +
      `(needle, query head) pairs whose largest q.k (plain JS) is the needle, keys as the cache holds them, rebuilt with quantize()/` +
      `dequantize() per kv head; mirror = the cache's output vs attention() over that rebuilt K and V (must be <= ${MIRROR_TOLERANCE}).`,
    `KIVI quality tok: the same rebuild with keys quantized per token (groups of ${KIVI_GROUP} channels): each group then spans an ` +
      `outlier channel, so its step is set by the outlier; tok/ch = rel.L2 per token / per channel.`,
    `KIVI quality KIVI-b+${KIVI_OUTLIER_FRACTION * 100}%: keys per channel with KVQuant's dense-and-sparse outliers (policy.store.outliers ` +
      `${KIVI_OUTLIER_FRACTION}): per key group the round(${KIVI_OUTLIER_FRACTION} x ${KIVI_GROUP} x headDim) and per value token the ` +
      `round(${KIVI_OUTLIER_FRACTION} x headDim) largest |x| are left out of min/max and kept as f16 corrections (4 bytes each); its ` +
      `tok/ch column = plain KIVI-b rel.L2 / this row's (above 1: the outliers help).`,
    `KIVI quality RoPE rows: the workload's keys as PRE-RoPE keys (needles planted so the margin holds after RoPE), rotated by ` +
      `their positions (theta ${KIVI_ROPE.theta}, ${KIVI_ROPE.style} pairs) into the post-RoPE keys (rounded to f16); queries post-RoPE (needle queries turned by their needle's position, ` +
      `plain ones by T). KIVI-b post-RoPE = plain KIVI over the rotated keys (rotation mixes each outlier channel with its pair ` +
      `partner); KIVI-b pre-RoPE = policy.store.preRope (per-channel groups over the pre-RoPE keys, rotated in attention); both vs exact ` +
      `attention over the rotated keys; needle hits on the held keys rotated; mirror = attention() over them. tok/ch on a pre-RoPE ` +
      `row = post-RoPE rel.L2 / pre-RoPE rel.L2.`,
    `Rerun the section: ${record.reproduce}.`,
  ];
}
