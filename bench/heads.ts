// The head-scoring section of `npm run bench` (methods/duoattention.md, "Engine procedure: classify
// heads from recorded Q/K/V only"; the issue's target): a workload whose kv heads either attend
// locally or retrieve needles far back, scored from its Q/K/V alone by scoreHeads, then a
// DuoAttention cache driven by those scores at retrievalRatio 0.5. Reported: whether every
// retrieving kv head scores above every local one, the tokens each head keeps against the truth,
// needle hits under the cache's selection, the output error of the heads it streams, bytes and cold
// decode time beside the full cache; and the same cache with the scores negated, which streams the
// needle heads: the checks are ones that can fail.
import { attention, attentionScores, KVCache, scoreHeadsDetailed, type HeadScoreLayer } from '../lib/index.js';
import { relativeL2Error } from './baseline.js';
import { APPEND_CHUNK_TOKENS, MODEL, QUERY_STRIDE, TOKEN_STRIDE, tokenLabel, TOLERANCE } from './cases.js';
import { gridValues } from './data.js';
import { ms, num, Table, type TargetResult } from './report.js';
import { elapsedMs, evictCaches, measure, summarizeSamples, type TimeStats, type TimingPlan } from './timing.js';

const { qHeads: Q, kvHeads: KV, headDim: D } = MODEL;
const GROUP = Q / KV;
const SCALE = 1 / Math.sqrt(D);
/** DuoAttention's defaults (methods/duoattention.md): sink 64, window 256, half the kv heads retrieve (GQA). */
const SINK = 64;
const WINDOW = 256;
const RETRIEVAL_RATIO = 0.5;
/** Probe queries per layer: the prompt's last PROBES rows (scoreHeads' default). */
const PROBES = 64;
/**
 * Query gain: a query α·k_target (keys scaled to norm √D) gives its target the logit α√D ≈ 22.6
 * and any other key about α·N(0, 1), so the target holds nearly all of the mass, and the rest
 * (what a streamed head drops) is about 1e-5 of it at 32K tokens.
 */
const ALPHA = 2;
/** A local query head's target: one of its last LOCAL_SPAN tokens (inside the window). */
const LOCAL_SPAN = 32;
/** Query noise (unit variance times this) on top of α·k_target. */
const QUERY_NOISE = 0.1;
/** Grid values (uniform in [-2, 2)) times this have unit variance. */
const UNIT = Math.sqrt(3) / 2;
const SEED = 41;
/**
 * Retrieving kv heads per layer (the rest attend locally): half of each layer's, different in each.
 * In PARTIAL[layer] only the first query head of the group retrieves: the kv head's score is the
 * max over its group, so one retrieving member must be enough to keep it whole.
 */
const RETRIEVING: readonly (readonly number[])[] = [[1, 2, 5, 6], [0, 3, 4, 7]];
const PARTIAL: readonly number[] = [5, 4];
const LAYERS = RETRIEVING.length;
/** Issue target for the heads DuoAttention streams: output relative L2 at most this. */
const STREAMED_TARGET = 0.01;

export interface HeadsPlan {
  tokens: number;
  /** Cold decode timing (one query, every layer) of the full and duo caches, interleaved. */
  decode: TimingPlan;
}

export function headsPlan(quick: boolean): HeadsPlan {
  return quick
    ? { tokens: 4096, decode: { warmupRuns: 1, minRuns: 9, maxRuns: 9, minTotalMs: 0 } }
    : { tokens: 32768, decode: { warmupRuns: 2, minRuns: 15, maxRuns: 15, minTotalMs: 0 } };
}

export interface HeadsContext {
  quick: boolean;
  reproduce: string;
  say: (text?: string) => void;
  status: (text: string) => void;
}

/** One cache over the workload: full, duo from the scores, or duo from the negated scores. */
export interface HeadsRow {
  kind: 'full' | 'duo' | 'duo-inverted';
  status: 'ok' | 'FAILED' | 'ERROR';
  error?: string;
  /** Tokens each kv head keeps after the probes, `[layer][kvHead]`. */
  kept?: number[][];
  /** Whether the kept tokens are the truth's: every token on retrieving kv heads, sink + window on local ones. */
  keptAsTruth?: boolean;
  bytesFraction?: number;
  /** Retrieving query heads' probes whose exact attention, over the tokens kept, peaks at their needle. */
  needleHits?: number;
  needlePairs?: number;
  /** The same for local query heads and their (recent) targets. */
  localHits?: number;
  localPairs?: number;
  /** Output relative L2 vs the full cache, over the probes, per query head: the worst of the heads the cache streams / keeps whole. */
  worstStreamedRelL2?: number | null;
  worstRetrievalRelL2?: number | null;
  decode?: TimeStats;
  /** decode / the full cache's, from runs interleaved with it. */
  timeFraction?: number;
}

export interface HeadsRecord {
  durationMs: number;
  plan: HeadsPlan;
  reproduce: string;
  workload: {
    tokens: number; layers: number; probes: number; alpha: number; localSpan: number; seed: number;
    retrieving: readonly (readonly number[])[]; partial: readonly number[];
    description: string;
  };
  duo: { sink: number; window: number; retrievalRatio: number };
  scores: {
    /** `[layers * kvHeads]`, as scoreHeads returns them. */
    values: number[];
    /** Seconds of scoreHeads over every layer (its JavaScript loops dominate). */
    scoreMs: number;
    lowestRetrieving: number;
    highestLocal: number;
    /** Fraction of (retrieving, local) kv-head pairs ranked in the right order (1: every retrieving head above every local one). */
    orderedPairs: number;
  };
  /** The full cache against exact attention(): the reference must be right. */
  check: { relL2Error: number; tolerance: number; passed: boolean };
  rows: HeadsRow[];
}

const headsTable = new Table([
  { title: 'cache', width: 13, left: true }, { title: 'kept tokens / kv head', width: 24, left: true }, { title: 'as truth', width: 8 },
  { title: 'bytes/full', width: 10 }, { title: 'decode ms', width: 9 }, { title: 'time/full', width: 9 },
  { title: 'needle hits', width: 11 }, { title: 'local hits', width: 10 }, { title: 'streamed rel.L2', width: 15 }, { title: 'kept rel.L2', width: 11 },
]);

interface Workload {
  T: number;
  layers: Array<HeadScoreLayer & { q: Float32Array }>;  // q: the PROBES probe rows only
  k: Float32Array[];
  v: Float32Array[];
  /** `[layer][qHead][probe]`: the position each probe query targets. */
  targets: Int32Array[][];
  /** `[layer * KV + kvHead]`: 1 where a query head of the kv head retrieves. */
  retrieving: Uint8Array;
}

/** xorshift32 integers in [0, n). */
function integers(seed: number): (n: number) => number {
  let state = seed | 0 || 0x9e3779b9;
  return (n) => {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    return (state >>> 0) % n;
  };
}

/**
 * Keys: unit-variance grid values, each (token, kv head) row scaled to norm √D; values: unit
 * variance. Probe row r (position t = T - PROBES + r) of a local query head asks α·k_t' with t' one
 * of its last LOCAL_SPAN tokens; of a retrieving one, α·k_needle with the needle drawn in
 * [SINK, t - 2·WINDOW): far outside sink ∪ recent. Plus QUERY_NOISE of noise.
 */
function buildWorkload(T: number): Workload {
  const next = integers(SEED);
  const retrieving = new Uint8Array(LAYERS * KV);
  const w: Workload = { T, layers: [], k: [], v: [], targets: [], retrieving };
  for (let layer = 0; layer < LAYERS; layer++) {
    const k = gridValues(T * TOKEN_STRIDE, SEED * 10 + layer * 3 + 1);
    for (let row = 0; row < T * KV; row++) {
      const x = k.subarray(row * D, (row + 1) * D);
      let norm = 0;
      for (let d = 0; d < D; d++) norm += x[d] * x[d];
      const factor = Math.sqrt(D / norm);
      for (let d = 0; d < D; d++) x[d] *= factor;
    }
    const v = gridValues(T * TOKEN_STRIDE, SEED * 10 + layer * 3 + 2).map((x) => x * UNIT);
    const q = gridValues(PROBES * QUERY_STRIDE, SEED * 10 + layer * 3 + 3).map((x) => x * UNIT * QUERY_NOISE);
    const targets: Int32Array[] = [];
    for (let h = 0; h < Q; h++) {
      const kvHead = Math.floor(h / GROUP);
      const far = RETRIEVING[layer].includes(kvHead) && (kvHead !== PARTIAL[layer] || h % GROUP === 0);
      if (far) retrieving[layer * KV + kvHead] = 1;
      const rows = new Int32Array(PROBES);
      for (let r = 0; r < PROBES; r++) {
        const t = T - PROBES + r;
        const target = far ? SINK + next(t - 2 * WINDOW - SINK) : t - next(LOCAL_SPAN);
        rows[r] = target;
        const key = k.subarray((target * KV + kvHead) * D, (target * KV + kvHead + 1) * D);
        const query = q.subarray((r * Q + h) * D, (r * Q + h + 1) * D);
        for (let d = 0; d < D; d++) query[d] += ALPHA * key[d];
      }
      targets.push(rows);
    }
    w.layers.push({ q, k, v });
    w.k.push(k);
    w.v.push(v);
    w.targets.push(targets);
  }
  return w;
}

/** The prompt (all but the probes) appended, then each probe stepped in: outputs `[layer]` of `[PROBES, Q, D]`. */
function fill(cache: KVCache, w: Workload): Float32Array[] {
  const prompt = w.T - PROBES;
  return w.layers.map((layer, l) => {
    for (let t = 0; t < prompt; t += APPEND_CHUNK_TOKENS) {
      const end = Math.min(prompt, t + APPEND_CHUNK_TOKENS);
      cache.append(l, w.k[l].subarray(t * TOKEN_STRIDE, end * TOKEN_STRIDE), w.v[l].subarray(t * TOKEN_STRIDE, end * TOKEN_STRIDE));
    }
    const out = new Float32Array(PROBES * QUERY_STRIDE);
    for (let r = 0; r < PROBES; r++) {
      const t = prompt + r;
      const token = (x: Float32Array) => x.subarray(t * TOKEN_STRIDE, (t + 1) * TOKEN_STRIDE);
      cache.step(l, layer.q.subarray(r * QUERY_STRIDE, (r + 1) * QUERY_STRIDE), token(w.k[l]), token(w.v[l]),
        { out: out.subarray(r * QUERY_STRIDE, (r + 1) * QUERY_STRIDE) });
    }
    return out;
  });
}

/** Relative L2 of one query head's outputs over the probes. */
function headRelL2(outputs: Float32Array, reference: Float32Array, h: number): number {
  const pick = (x: Float32Array) => {
    const out = new Float32Array(PROBES * D);
    for (let r = 0; r < PROBES; r++) out.set(x.subarray((r * Q + h) * D, (r * Q + h + 1) * D), r * D);
    return out;
  };
  return relativeL2Error(pick(outputs), pick(reference));
}

/** Kept tokens, bytes and per-head output errors of one cache after the probes. */
function keptAndErrors(row: HeadsRow, cache: KVCache, w: Workload, outputs: Float32Array[], reference: Float32Array[] | null): void {
  let worstStreamed: number | null = null, worstRetrieval: number | null = null;
  row.kept = [];
  // The full cache is the reference: no truth to keep, no error against itself.
  if (reference !== null) row.keptAsTruth = true;
  for (let l = 0; l < LAYERS; l++) {
    const kept: number[] = [];
    for (let kvHead = 0; kvHead < KV; kvHead++) {
      const tokens = cache.positions(l, kvHead).length;
      kept.push(tokens);
      if (reference === null) continue;
      if (tokens !== (w.retrieving[l * KV + kvHead] ? w.T : SINK + WINDOW)) row.keptAsTruth = false;
      for (let member = 0; member < GROUP; member++) {
        const error = headRelL2(outputs[l], reference[l], kvHead * GROUP + member);
        if (tokens === w.T) worstRetrieval = Math.max(worstRetrieval ?? 0, error);
        else worstStreamed = Math.max(worstStreamed ?? 0, error);
      }
    }
    row.kept.push(kept);
  }
  Object.assign(row, { worstStreamedRelL2: worstStreamed, worstRetrievalRelL2: worstRetrieval });
  const stats = cache.stats();
  row.bytesFraction = stats.bytes.kv / stats.bytes.fullF16;
}

/**
 * Needle and local hits of every cache: a probe hits when its exact attention over the tokens its
 * kv head keeps peaks at its target. Probabilities are monotone in the scores, so that is the
 * scores' argmax over the kept tokens; the probes' scores come per (layer, kv head) into one buffer.
 */
function countHits(rows: HeadsRow[], caches: Array<KVCache | null>, w: Workload): void {
  const scores = new Float32Array(PROBES * GROUP * w.T);
  const hits = rows.map(() => ({ needleHits: 0, needlePairs: 0, localHits: 0, localPairs: 0 }));
  for (let l = 0; l < LAYERS; l++) {
    for (let kvHead = 0; kvHead < KV; kvHead++) {
      attentionScores({ q: w.layers[l].q, k: w.k[l], qHeads: Q, kvHeads: KV, headDim: D, kvHead, scale: SCALE, device: 'cpu', out: scores });
      caches.forEach((cache, i) => {
        if (cache === null) return;
        const positions = cache.positions(l, kvHead);
        for (let member = 0; member < GROUP; member++) {
          const h = kvHead * GROUP + member;
          const retrieves = RETRIEVING[l].includes(kvHead) && (kvHead !== PARTIAL[l] || member === 0);
          for (let r = 0; r < PROBES; r++) {
            const t = w.T - PROBES + r, base = (r * GROUP + member) * w.T;
            let best = -1, bestScore = -Infinity;
            for (const p of positions) {
              if (p > t) break;
              if (scores[base + p] > bestScore) { bestScore = scores[base + p]; best = p; }
            }
            const hit = best === w.targets[l][h][r] ? 1 : 0;
            if (retrieves) { hits[i].needlePairs++; hits[i].needleHits += hit; } else { hits[i].localPairs++; hits[i].localHits += hit; }
          }
        }
      });
    }
  }
  caches.forEach((cache, i) => { if (cache !== null) Object.assign(rows[i], hits[i]); });
}

function keptText(kept: number[][] | undefined): string {
  if (kept === undefined) return '-';
  const counts = new Map<number, number>();
  for (const n of kept.flat()) counts.set(n, (counts.get(n) ?? 0) + 1);
  return [...counts].sort((a, b) => b[0] - a[0]).map(([n, c]) => `${c}x${n}`).join(', ');
}

function rowLine(row: HeadsRow): string {
  if (row.status !== 'ok') return headsTable.line([row.kind, row.error ?? row.status]);
  const rel = (x: number | null | undefined) => (x === null || x === undefined ? '-' : x.toExponential(1));
  return headsTable.line([
    row.kind, keptText(row.kept), row.keptAsTruth === undefined ? '-' : row.keptAsTruth ? 'yes' : 'no', num(row.bytesFraction, 3), row.decode ? ms(row.decode.medianMs) : '-',
    num(row.timeFraction, 2), `${row.needleHits}/${row.needlePairs}`, `${row.localHits}/${row.localPairs}`,
    rel(row.worstStreamedRelL2), rel(row.worstRetrievalRelL2),
  ]);
}

/** Fraction of (retrieving, local) kv-head pairs whose scores are in the right order. */
function orderedPairs(values: Float32Array, retrieving: Uint8Array): number {
  let right = 0, pairs = 0;
  values.forEach((a, i) => {
    if (!retrieving[i]) return;
    values.forEach((b, j) => {
      if (retrieving[j]) return;
      pairs++;
      if (a > b) right++;
    });
  });
  return pairs === 0 ? NaN : right / pairs;
}

export function runHeads(context: HeadsContext): HeadsRecord {
  const startedAt = Date.now();
  const { say, status } = context;
  const plan = headsPlan(context.quick);
  const T = plan.tokens;
  say();
  say(`Head scoring -> DuoAttention: ${tokenLabel(T)} tokens x ${LAYERS} layers (32q/8kv/128, f16) in which kv heads ` +
    `${RETRIEVING.map((heads, l) => `${heads.join(', ')} (layer ${l})`).join(' and ')} retrieve needles far back (in kv heads ` +
    `${PARTIAL.join(' and ')} only the group's first query head) and the others attend to their last ${LOCAL_SPAN} tokens; ` +
    `scoreHeads scores them from the last ${PROBES} rows' Q/K/V, and duo keeps the top ${RETRIEVAL_RATIO * 100}% whole, ` +
    `the rest sink ${SINK} + window ${WINDOW}.`);
  status(`generating the ${tokenLabel(T)}-token heads workload...`);
  const w = buildWorkload(T);

  status('scoring heads from the recorded Q/K/V...');
  let detailed = null as ReturnType<typeof scoreHeadsDetailed> | null;
  const scoreMs = elapsedMs(() => {
    detailed = scoreHeadsDetailed(w.layers, { qHeads: Q, kvHeads: KV, headDim: D, sink: SINK, window: WINDOW, probes: PROBES, device: 'cpu' });
  });
  const values = detailed!.scores;
  let lowestRetrieving = Infinity, highestLocal = -Infinity;
  values.forEach((score, i) => {
    if (w.retrieving[i]) lowestRetrieving = Math.min(lowestRetrieving, score);
    else highestLocal = Math.max(highestLocal, score);
  });
  const ordered = orderedPairs(values, w.retrieving);
  say(`  scores (scoreHeads, ${ms(scoreMs)} ms for ${LAYERS} layers): retrieving kv heads ${lowestRetrieving.toExponential(2)} and up, ` +
    `local ones ${highestLocal.toExponential(2)} at most; ${(ordered * 100).toFixed(0)}% of (retrieving, local) pairs in order.`);

  const exact = w.layers.map((layer, l) => attention({
    q: layer.q, k: w.k[l], v: w.v[l], qHeads: Q, kvHeads: KV, headDim: D, causal: true, scale: SCALE, device: 'cpu',
  }));

  say(headsTable.header());
  const specs: Array<{ kind: HeadsRow['kind']; select: object | null }> = [
    { kind: 'full', select: null },
    { kind: 'duo', select: { kind: 'duo', heads: values, sink: SINK, window: WINDOW, retrievalRatio: RETRIEVAL_RATIO } },
    { kind: 'duo-inverted', select: { kind: 'duo', heads: values.map((x) => -x), sink: SINK, window: WINDOW, retrievalRatio: RETRIEVAL_RATIO } },
  ];
  const rows: HeadsRow[] = [];
  const caches: Array<KVCache | null> = [];
  let reference: Float32Array[] | null = null;
  let check = { relL2Error: NaN, tolerance: TOLERANCE, passed: false };
  for (const spec of specs) {
    const row: HeadsRow = { kind: spec.kind, status: 'ok' };
    rows.push(row);
    let cache: KVCache | null = null;
    try {
      status(`${spec.kind}: appending ${tokenLabel(T)} tokens x ${LAYERS} layers, stepping ${PROBES} probes...`);
      cache = new KVCache({
        layers: LAYERS, qHeads: Q, kvHeads: KV, headDim: D, device: 'cpu',
        policy: { store: { kind: 'f16' }, ...(spec.select === null ? {} : { select: spec.select as never }) },
      });
      const outputs = fill(cache, w);
      keptAndErrors(row, cache, w, outputs, reference);
      if (reference === null) {
        reference = outputs;
        const relL2Error = Math.max(...outputs.map((out, l) => relativeL2Error(out, exact[l])));
        check = { relL2Error, tolerance: TOLERANCE, passed: relL2Error <= TOLERANCE };  // NaN fails too
        if (!check.passed) row.status = 'FAILED';
      }
    } catch (error) {
      row.status = 'ERROR';
      row.error = (error instanceof Error ? `${error.name}: ${error.message}` : String(error)).split('\n')[0];
    }
    caches.push(row.status === 'ok' ? cache : null);
    if (row.status !== 'ok') cache?.dispose();
  }

  status('counting needle hits under each cache\'s selection...');
  countHits(rows, caches, w);

  // Cold decode of the last probe's query over every layer, each duo run right after a full one.
  const q = w.layers[0].q.subarray((PROBES - 1) * QUERY_STRIDE);
  const full = caches[0];
  const out = new Float32Array(QUERY_STRIDE);
  const timed = (cache: KVCache) => {
    evictCaches();
    return elapsedMs(() => {
      for (let l = 0; l < LAYERS; l++) cache.attend(l, q, { out });
    }) / LAYERS;
  };
  if (full !== null) {
    const fullSamples: number[] = [];
    rows.forEach((row, i) => {
      const cache = caches[i];
      if (i === 0 || cache === null) return;
      status(`${row.kind}: timing decode (cold) beside the full cache...`);
      const first = fullSamples.length;
      row.decode = measure(plan.decode, () => {
        fullSamples.push(timed(full));
        return timed(cache);
      });
      fullSamples.splice(first, plan.decode.warmupRuns);  // the full runs beside this row's warm-up runs
    });
    rows[0].decode = summarizeSamples(fullSamples);
    for (const row of rows) if (row.decode) row.timeFraction = row.decode.medianMs / rows[0].decode.medianMs;
  }
  for (const cache of caches) cache?.dispose();
  for (const row of rows) say(rowLine(row));
  return {
    durationMs: Date.now() - startedAt,
    plan,
    reproduce: context.reproduce,
    workload: {
      tokens: T, layers: LAYERS, probes: PROBES, alpha: ALPHA, localSpan: LOCAL_SPAN, seed: SEED, retrieving: RETRIEVING, partial: PARTIAL,
      description: 'keys: unit-variance grid values scaled to norm sqrt(headDim) per row; values: unit variance; probe row r (position ' +
        `T - ${PROBES} + r) of a local query head asks alpha * k of one of its last ${LOCAL_SPAN} tokens, of a retrieving one alpha * k ` +
        `of a needle drawn in [${SINK}, t - ${2 * WINDOW}), plus ${QUERY_NOISE} x unit-variance noise`,
    },
    duo: { sink: SINK, window: WINDOW, retrievalRatio: RETRIEVAL_RATIO },
    scores: { values: Array.from(values), scoreMs, lowestRetrieving, highestLocal, orderedPairs: ordered },
    check,
    rows,
  };
}

export function headsTargets(record: HeadsRecord | null): TargetResult[] {
  const T = tokenLabel(record?.plan.tokens ?? headsPlan(false).tokens);
  const duo = record?.rows.find((r) => r.kind === 'duo');
  const verdict = (value: number | null | undefined, met: (x: number) => boolean): TargetResult['verdict'] =>
    record === null || duo === undefined ? 'not measured' : duo.status !== 'ok' ? duo.status
      : value === null || value === undefined || !Number.isFinite(value) ? 'not measured' : met(value) ? 'met' : 'not met';
  const ordered = record?.scores.orderedPairs ?? null;
  const hitRate = duo?.needleHits === undefined || !duo.needlePairs ? null : duo.needleHits / duo.needlePairs;
  const streamed = duo?.worstStreamedRelL2 ?? null;
  return [
    {
      name: `head scorer ${T}: (retrieving, local) kv-head pairs ranked in order`, caseId: 'heads-scores', value: ordered, target: 1,
      unit: 'fraction', verdict: record === null ? 'not measured' : verdict(ordered, (x) => x >= 1),
    },
    {
      name: `duo 50% retrieval heads ${T}: needle hit rate`, caseId: 'heads-duo', value: hitRate, target: 1, unit: 'fraction',
      verdict: verdict(hitRate, (x) => x >= 1),
    },
    {
      name: `duo 50% retrieval heads ${T}: worst rel.L2 of a streamed head`, caseId: 'heads-duo', value: streamed, target: STREAMED_TARGET,
      unit: 'percent', atMost: true, verdict: verdict(streamed, (x) => x <= STREAMED_TARGET),
    },
  ];
}

export function headsFailures(record: HeadsRecord | null): string[] {
  if (record === null) return [];
  return record.rows.filter((r) => r.status !== 'ok').map((r) => `heads-${r.kind} (${r.status})`);
}

export function headsNotes(record: HeadsRecord): string[] {
  return [
    `Heads: kept = tokens per kv head after the probes (how many heads keep how many); as truth = every token on the retrieving kv heads, ` +
      `sink + window on the local ones; bytes/full = stats bytes.kv / bytes.fullF16; decode ms = attend() of the last probe's query, ` +
      `cold, per layer, each run after one of the full cache; needle hits = retrieving query heads' probes whose exact attention over ` +
      `the kept tokens peaks at their needle (local hits: local heads and their recent targets); streamed / kept rel.L2 = the worst ` +
      `query head's output error over the probes vs the full cache, among heads duo streams / keeps whole. duo-inverted negates the ` +
      `scores, so it streams the retrieving heads. The full cache vs exact attention(): rel.err ${record.check.relL2Error.toExponential(1)} ` +
      `(tolerance ${record.check.tolerance}). Rerun: ${record.reproduce}.`,
  ];
}
