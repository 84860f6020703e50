// Retrieval-head scores from recorded Q/K/V only (methods/duoattention.md, "Engine procedure:
// classify heads from recorded Q/K/V only"): how much each head's output changes when it is
// restricted to sinks + a recent window, how much attention mass lies outside that window, and
// whether the head copies from far back. The scores feed `policy.select = { kind: 'duo', heads }`.
import { attention, attentionScores } from '../attention.js';
import type { Device } from '../backends.js';
import { describe, KVSlimError } from '../errors.js';
import type { Trace } from '../trace/trace.js';
import {
  type Dtype, knownKeys, oneOf, optionError, plainObject, positiveInteger, positiveNumber, rowsOf, sharedDtype, type Tensor,
} from '../validate.js';

/** One layer's recorded tensors: `q: [n, qHeads, headDim]`, `k, v: [T, kvHeads, headDim]`, n <= T. */
export interface HeadScoreLayer {
  q: Tensor;
  k: Tensor;
  v: Tensor;
}

/** Options of {@link scoreHeads} and {@link scoreHeadsDetailed}. */
export interface ScoreHeadsOptions {
  /** Required with an array of layers; taken from `trace.meta.config` for a trace (must agree if given). */
  qHeads?: number;
  kvHeads?: number;
  headDim?: number;
  /** Element type of every tensor: `f32` (Float32Array, default) or `f16` / `bf16` (Uint16Array). */
  dtype?: Dtype;
  /** Softmax scale (default `1 / sqrt(headDim)`). */
  scale?: number;
  /** Sink tokens of the streaming alternative (default 64, Duo's deploy setting). Score with the S you deploy. */
  sink?: number;
  /** Recent tokens of the streaming alternative, counting the query itself (default 256). */
  window?: number;
  /** Probe queries per layer: the last `probes` rows of q (default 64; all rows when q has fewer). */
  probes?: number;
  /**
   * The prompt ends with a segment of L tokens repeated twice (see `headProbe`): score copying
   * exactly (Wu et al.) instead of by the sequential-copy proxy.
   */
  copySegment?: number;
  /** Where the full-attention outputs are computed (default `auto`). */
  device?: Device;
  /** Called after each layer is scored (a long trace takes about a second per 32K-token layer). */
  onProgress?: (progress: { layer: number; layers: number }) => void;
}

/** Per-head details of {@link scoreHeadsDetailed}. Per-query-head arrays are `[layers, qHeads]`. */
export interface HeadScores {
  layers: number;
  qHeads: number;
  kvHeads: number;
  /** The per-kv-head score `[layers, kvHeads]` that {@link scoreHeads} returns. */
  scores: Float32Array;
  /** E_h: mean over probes of the deviation `||o - o_s||^2 / (||o||^2 + 1e-12)`. */
  deviation: Float32Array;
  /** M_h: mean over probes of the distant mass `1 - sum of p over sink ∪ recent`. */
  distantMass: Float32Array;
  /** R_h: the copy score (exact with `copySegment`, else the sequential-copy proxy). */
  copy: Float32Array;
  /** `'segment'` with `copySegment`, `'proxy'` without. */
  copyMode: 'segment' | 'proxy';
  /** `[layers, kvHeads]`: 1 where a query head of the group has R_h > {@link COPY_THRESHOLD}. */
  copyHeads: Uint8Array;
  /** Per layer: the probe rows scored, and how many of them the copy score counted. */
  probes: number[];
  copySteps: number[];
}

/** A query head with copy score above this is a retrieval head (Wu et al.). */
export const COPY_THRESHOLD = 0.1;
/** The ε of the deviation's denominator. */
const EPSILON = 1e-12;

const scoreKeys = ['qHeads', 'kvHeads', 'headDim', 'dtype', 'scale', 'sink', 'window', 'probes', 'copySegment', 'device', 'onProgress'] as const;

/**
 * Retrieval-head scores `[layers, kvHeads]` from recorded Q/K/V (a {@link Trace} or an array of
 * `{ q, k, v }` layers): higher means the head needs its full context. Pass them as
 * `policy.select = { kind: 'duo', heads: scores, sink, window }` with the same `sink` / `window`.
 * See {@link scoreHeadsDetailed} for the procedure, the formula and the per-head details.
 */
export function scoreHeads(input: Trace | readonly HeadScoreLayer[], options?: ScoreHeadsOptions): Float32Array {
  return scoreHeadsDetailed(input, options).scores;
}

/**
 * Classifies heads from recorded Q/K/V (methods/duoattention.md). Per layer, the probes are the
 * last `m = min(probes, n)` query rows, at positions `t = T - m .. T - 1` (causal alignment). For
 * each query head h and probe t, with p the attention probabilities over keys `0..t`, o the exact
 * output (the native `attention()`), and N(t) = `[0, sink) ∪ (t - window, t]` the tokens a
 * streaming head keeps:
 * - `o_s` = attention restricted to N(t) (softmax renormalised over N(t));
 * - deviation `δ = ||o - o_s||² / (||o||² + 1e-12)`, distant mass `μ = 1 - Σ_{j ∈ N(t)} p_j`;
 * - `E_h` = mean δ, `M_h` = mean μ over the probes;
 * - copy score `R_h`: with `copySegment = L` (the last 2L prompt tokens are a segment and its
 *   repeat), the fraction of probes in the second copy (t >= T - L) whose argmax p is t - L + 1
 *   (the first copy's next token: Wu et al.'s copy-paste test); without it, the proxy: the
 *   fraction of the m - 1 probe steps where `a_t = argmax p` lies outside N(t) and
 *   `a_t = a_{t-1} + 1` (a sequential copy from far back).
 *
 * Per kv head κ (query heads `G(κ)`; a kv head may stream only if all its query heads can):
 * `E_κ = max_{h ∈ G(κ)} E_h`, `copy_κ = [max_{h ∈ G(κ)} R_h > 0.1]`, and
 * `score_κ = E_κ + copy_κ * (1 + max_{all layers, κ'} E_κ')`, so copy heads rank above every
 * other head and, within each class, heads rank by deviation; `copyHeads` holds `copy_κ`, which
 * duo's `copyHeads` keeps whole even past its `retrievalRatio` (always OR with R > 0.1). Without
 * copy heads the score is the plain deviation energy E_κ, the training-free analogue of Duo's
 * gate (a gate α* >= 0.5 iff E >= λ). Combining scores across calls (traces): average the
 * detailed `deviation` / `copy` arrays, not the scores, whose copy offset depends on the call.
 *
 * Cost per layer: one `attention()` call for the probes' outputs and one `attentionScores()`
 * call per kv head for their scores (native), then, in JavaScript, each probe's softmax over
 * every key and its streamed output over sink ∪ recent (the argmax and the distant mass need each
 * probability): O(m · qHeads · T) exponentials, a 32K-token layer with 32 query heads of 128 and
 * 64 probes in about 1.3 s on 2 cores (`npm run bench -- --only heads`). Offline work;
 * `headProbe` prompts are short.
 * Errors: `ERR_SHAPE` naming the tensor (`layers[i].k`), `ERR_OPTION` naming the option,
 * `ERR_DTYPE`, `ERR_VALUE` for non-finite elements (from `attention()`).
 */
export function scoreHeadsDetailed(input: Trace | readonly HeadScoreLayer[], options?: ScoreHeadsOptions): HeadScores {
  const o = options === undefined ? {} : plainObject('scoreHeads options', options);
  knownKeys('scoreHeads', o, scoreKeys);
  const { layers, shape } = resolveInput(input, o);
  const { qHeads, kvHeads, headDim } = shape;
  if (qHeads % kvHeads !== 0) {
    throw optionError(`Expected qHeads to be a multiple of kvHeads but received qHeads=${qHeads}, kvHeads=${kvHeads}`);
  }
  const sink = o.sink === undefined ? 64 : nonNegativeInteger('sink', o.sink);
  const window = o.window === undefined ? 256 : positiveInteger('window', o.window);
  const probes = o.probes === undefined ? 64 : positiveInteger('probes', o.probes);
  const copySegment = o.copySegment === undefined ? null : positiveInteger('copySegment', o.copySegment);
  const scale = o.scale === undefined ? 1 / Math.sqrt(headDim) : positiveNumber('scale', o.scale);
  const device = o.device === undefined ? 'auto' : oneOf('device', o.device, ['auto', 'cpu', 'cuda'] as const);
  if (o.onProgress !== undefined && typeof o.onProgress !== 'function') {
    throw optionError(`Expected a function for onProgress but received ${describe(o.onProgress)}`);
  }
  const onProgress = o.onProgress as ScoreHeadsOptions['onProgress'];

  // Check every layer before any work: a bad layer 7 should not cost the scoring of layers 0-6.
  const checked = layers.map((layer, i) => checkLayer(layer, i, shape, o.dtype, copySegment));

  const count = layers.length;
  const result: HeadScores = {
    layers: count, qHeads, kvHeads,
    scores: new Float32Array(count * kvHeads),
    deviation: new Float32Array(count * qHeads),
    distantMass: new Float32Array(count * qHeads),
    copy: new Float32Array(count * qHeads),
    copyMode: copySegment === null ? 'proxy' : 'segment',
    copyHeads: new Uint8Array(count * kvHeads),
    probes: [],
    copySteps: [],
  };
  const params = { qHeads, kvHeads, headDim, scale, sink, window, probes, copySegment, device };
  checked.forEach((layer, i) => {
    scoreLayer(layer, i, params, result);
    onProgress?.({ layer: i, layers: count });
  });

  // Per kv head: the max over its query heads; copy heads offset above every other head.
  const group = qHeads / kvHeads;
  const energy = new Float64Array(count * kvHeads);
  let maxEnergy = 0;
  for (let index = 0; index < count * kvHeads; index++) {
    let e = 0, r = 0;
    for (let g = 0; g < group; g++) {
      e = Math.max(e, result.deviation[index * group + g]);
      r = Math.max(r, result.copy[index * group + g]);
    }
    energy[index] = e;
    maxEnergy = Math.max(maxEnergy, e);
    // R is stored as f32: 1 hit in 10 steps reads 0.10000000149, which must not pass R > 0.1.
    result.copyHeads[index] = r > Math.fround(COPY_THRESHOLD) ? 1 : 0;
  }
  for (let index = 0; index < count * kvHeads; index++) {
    result.scores[index] = energy[index] + (result.copyHeads[index] ? 1 + maxEnergy : 0);
  }
  return result;
}

interface Shape { qHeads: number; kvHeads: number; headDim: number }
interface CheckedLayer { q: Tensor; k: Tensor; v: Tensor; dtype: Dtype; n: number; T: number }

function nonNegativeInteger(name: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > 2 ** 31 - 1) {
    throw optionError(`Expected a non-negative integer for ${name} but received ${describe(value)}`);
  }
  return value;
}

function isTrace(input: unknown): input is Trace {
  if (typeof input !== 'object' || input === null || Array.isArray(input)) return false;
  const record = input as Record<string, unknown>;
  return Array.isArray(record.layers) && typeof record.meta === 'object' && record.meta !== null;
}

/** The layers and their shape: from a trace's config (options must agree) or from the options. */
function resolveInput(input: unknown, o: Record<string, unknown>): { layers: readonly unknown[]; shape: Shape } {
  const fields = ['qHeads', 'kvHeads', 'headDim'] as const;
  if (isTrace(input)) {
    const config = (input.meta as { config?: unknown }).config;
    if (typeof config !== 'object' || config === null) {
      throw optionError(`Expected a trace with meta.config but received ${describe(config)}`);
    }
    const record = config as Record<string, unknown>;
    const shape = {} as Record<(typeof fields)[number], number>;
    for (const field of fields) {
      shape[field] = positiveInteger(`trace.meta.config.${field}`, record[field]);
      if (o[field] !== undefined && o[field] !== shape[field]) {
        throw optionError(`Expected ${field} to match the trace's config (${shape[field]}) but received ${describe(o[field])}`);
      }
    }
    if (input.layers.length === 0) throw new KVSlimError('ERR_SHAPE', 'Expected trace.layers to hold at least one layer but it is empty');
    return { layers: input.layers, shape };
  }
  if (!Array.isArray(input)) {
    throw optionError(`Expected a Trace or an array of { q, k, v } layers for scoreHeads but received ${describe(input)}`);
  }
  if (input.length === 0) throw new KVSlimError('ERR_SHAPE', 'Expected layers to hold at least one layer but it is empty');
  const shape = {} as Record<(typeof fields)[number], number>;
  for (const field of fields) {
    if (o[field] === undefined) throw optionError(`scoreHeads: ${field} is required when scoring an array of layers`);
    shape[field] = positiveInteger(field, o[field], field === 'headDim' ? 1024 : undefined);
  }
  return { layers: input, shape };
}

function checkLayer(layer: unknown, i: number, shape: Shape, dtype: unknown, copySegment: number | null): CheckedLayer {
  if (typeof layer !== 'object' || layer === null || Array.isArray(layer)) {
    throw new KVSlimError('ERR_SHAPE', `Expected layers[${i}] to be an object { q, k, v } but received ${describe(layer)}`);
  }
  const l = layer as Record<string, unknown>;
  const name = (part: string) => `layers[${i}].${part}`;
  const resolved = sharedDtype({ [name('q')]: l.q, [name('k')]: l.k, [name('v')]: l.v }, dtype);
  const q = l.q as Tensor, k = l.k as Tensor, v = l.v as Tensor;
  const n = rowsOf(name('q'), q, shape.qHeads, shape.headDim, 'qHeads');
  const T = rowsOf(name('k'), k, shape.kvHeads, shape.headDim, 'kvHeads');
  if (v.length !== k.length) {
    throw new KVSlimError('ERR_SHAPE', `Expected ${name('v')} to hold as many elements as ${name('k')} (${k.length}) but received ${v.length}`);
  }
  if (n > T) {
    throw new KVSlimError('ERR_SHAPE', `Expected ${name('q')} to hold at most T = ${T} rows (the keys of ${name('k')}) but it holds ${n}`);
  }
  if (copySegment !== null && 2 * copySegment > T) {
    throw optionError(`Expected copySegment (${copySegment}) to fit twice in layer ${i}'s T = ${T} tokens`);
  }
  return { q, k, v, dtype: resolved, n, T };
}

let f16Table: Float32Array | null = null;

/** Float32 elements of a tensor: f32 as is, f16 / bf16 bits decoded. */
function toFloat32(x: Tensor, dtype: Dtype): Float32Array {
  if (dtype === 'f32') return x as Float32Array;
  const out = new Float32Array(x.length);
  if (dtype === 'bf16') {
    const bits = new Uint32Array(out.buffer);
    for (let i = 0; i < x.length; i++) bits[i] = x[i] << 16;
    return out;
  }
  if (f16Table === null) {
    f16Table = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) {
      const sign = h & 0x8000 ? -1 : 1, exponent = (h >>> 10) & 0x1f, mantissa = h & 0x3ff;
      f16Table[h] = exponent === 0 ? sign * mantissa * 2 ** -24
        : exponent === 31 ? (mantissa === 0 ? sign * Infinity : Number.NaN)
          : sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
    }
  }
  for (let i = 0; i < x.length; i++) out[i] = f16Table[x[i]];
  return out;
}

interface Params extends Shape {
  scale: number; sink: number; window: number; probes: number; copySegment: number | null; device: Device;
}

function scoreLayer(layer: CheckedLayer, index: number, params: Params, result: HeadScores): void {
  const { qHeads, kvHeads, headDim: D, scale, sink, window, copySegment } = params;
  const { n, T, dtype } = layer;
  const m = Math.min(params.probes, n);
  const qRow = qHeads * D, kvRow = kvHeads * D;
  // f16 / bf16 inputs are decoded one layer at a time (the scores are computed in JavaScript).
  const probeQ = toFloat32(layer.q.subarray((n - m) * qRow, n * qRow), dtype);
  const k = toFloat32(layer.k, dtype), v = toFloat32(layer.v, dtype);
  // Exact outputs of the probes (query r at position T - m + r); also rejects non-finite inputs.
  const full = attention({ q: probeQ, k, v, qHeads, kvHeads, headDim: D, causal: true, scale, device: params.device });

  const group = qHeads / kvHeads;
  const streamed = new Float64Array(D);
  let copySteps = 0;
  // One buffer for every kv head's scores: fresh pages per call cost more than the scores.
  const scores = new Float32Array(m * group * T);
  for (let h = 0; h < qHeads; h++) {
    const kvHead = Math.floor(h / group), member = h % group;
    const kvOffset = kvHead * D;
    // The probes' scores q.k * scale against every key, natively, once per kv head: [m, group, T].
    if (member === 0) {
      attentionScores({ q: probeQ, k, qHeads, kvHeads, headDim: D, kvHead, scale, device: params.device, out: scores });
    }
    let deviationSum = 0, massSum = 0, hits = 0, steps = 0, previous = -1;
    {
      for (let r = 0; r < m; r++) {
        const t = T - m + r;
        const logits = scores.subarray((r * group + member) * T, (r * group + member) * T + t + 1);
        // The max and argmax of the scores over keys 0..t (the first on ties).
        let max = -Infinity, argmax = 0;
        for (let j = 0; j <= t; j++) {
          if (logits[j] > max) { max = logits[j]; argmax = j; }
        }
        // N(t) = [0, sinkEnd) ∪ [recentStart, t]; the distant tokens are [sinkEnd, recentStart).
        const sinkEnd = Math.min(sink, t + 1);
        const recentStart = Math.max(sinkEnd, t - window + 1);
        let near = 0, far = 0, nearMax = -Infinity;
        for (let j = 0; j < sinkEnd; j++) { near += Math.exp(logits[j] - max); nearMax = Math.max(nearMax, logits[j]); }
        for (let j = sinkEnd; j < recentStart; j++) far += Math.exp(logits[j] - max);
        for (let j = recentStart; j <= t; j++) { near += Math.exp(logits[j] - max); nearMax = Math.max(nearMax, logits[j]); }
        massSum += far / (near + far);
        // o_s: softmax over N(t) alone, shifted by its own max (N(t) may hold no mass at all).
        streamed.fill(0);
        let weightSum = 0;
        for (let j = 0; j <= t; j++) {
          if (j === sinkEnd) j = recentStart;
          const w = Math.exp(logits[j] - nearMax);
          weightSum += w;
          for (let d = 0, vOffset = j * kvRow + kvOffset; d < D; d++) streamed[d] += w * v[vOffset + d];
        }
        let difference = 0, norm = 0;
        for (let d = 0, oOffset = r * qRow + h * D; d < D; d++) {
          const exact = full[oOffset + d];
          const delta = exact - streamed[d] / weightSum;
          difference += delta * delta;
          norm += exact * exact;
        }
        deviationSum += difference / (norm + EPSILON);
        // Copy: exact on the repeated segment, else the sequential-copy proxy.
        if (copySegment !== null) {
          if (t >= T - copySegment) {
            steps++;
            if (argmax === t - copySegment + 1) hits++;
          }
        } else if (r > 0) {
          steps++;
          if (argmax >= sinkEnd && argmax < recentStart && argmax === previous + 1) hits++;
        }
        previous = argmax;
      }
    }
    const at = index * qHeads + h;
    result.deviation[at] = deviationSum / m;
    result.distantMass[at] = massSum / m;
    result.copy[at] = steps === 0 ? 0 : hits / steps;
    copySteps = steps;
  }
  result.probes.push(m);
  result.copySteps.push(copySteps);
}
