// Built-in synthetic workloads for `evaluate`: deterministic from a seed, shaped like the caches real
// models build (SCBench's Retr.KV task in miniature, see the scbench method spec (methods/scbench.md)):
//  - an attention sink: token 0's key lies along a direction every query shares, so it takes a
//    large share of the mass of ordinary queries;
//  - a few large-magnitude key channels (a constant offset per head, as in KIVI's per-channel
//    outliers), placed in the slowest-rotating RoPE pairs;
//  - keys rotated by RoPE (adjacent pairs, theta 10000), so they hold their position;
//  - local smoothness: keys and values follow an AR(1) process along positions;
//  - planted needles: one token per needle whose key (in every kv head) one later query aligns
//    with, so that the needle's value dominates that query's attention output.
// Each turn asks a fresh set of needles; every token (context and queries) has q, k and v.
import { KVSlimError } from '../errors.js';
import { mulberry32 } from '../random.js';

/** The shapes of a workload (one layer: `k`, `v` are `[n, kvHeads, headDim]`, `q` is `[n, qHeads, headDim]`). */
export interface WorkloadConfig {
  layers: number;
  qHeads: number;
  kvHeads: number;
  headDim: number;
}

/** One planted needle: its position in the context and the turn and query that ask for it. */
export interface Needle {
  position: number;
  turn: number;
  /** Index of the asking query within its turn. */
  query: number;
}

/** Tokens of one query turn, per layer: `q` `[n, qHeads, headDim]`, `k`/`v` `[n, kvHeads, headDim]`. */
export interface WorkloadTurn {
  layers: Array<{ q: Float32Array; k: Float32Array; v: Float32Array }>;
  /** Needle position asked by each query token (null: the token asks none). */
  needles: Array<number | null>;
}

/** A shared context plus query turns (what `evaluate` replays), from a workload or a trace. */
export interface EvalSource {
  name: string;
  config: WorkloadConfig;
  contextTokens: number;
  /** Per layer: keys and values of the context `[contextTokens, kvHeads, headDim]`. */
  context: Array<{ k: Float32Array; v: Float32Array }>;
  /**
   * Per layer: queries of the last `observedTokens` context tokens `[observedTokens, qHeads, headDim]`
   * (prefilled, so query-aware policies see them; the rest of the context is appended).
   */
  observed: Float32Array[];
  observedTokens: number;
  turns: WorkloadTurn[];
  /** The generator's seed (null for a trace). */
  seed: number | null;
}

/** Parameters of a named workload. */
export interface WorkloadSpec extends WorkloadConfig {
  contextTokens: number;
  /** Turns the workload holds (evaluate may use fewer). */
  turns: number;
  /** Query tokens per turn; each asks one needle. */
  queriesPerTurn: number;
  /** Context tokens prefilled with their queries. */
  observedTokens: number;
  seed: number;
}

/** The named workloads. `needles-4k` is small enough for tests; `needles-32k` is the evaluation default. */
export const WORKLOADS: Readonly<Record<string, WorkloadSpec>> = {
  'needles-4k': { layers: 2, qHeads: 8, kvHeads: 2, headDim: 64, contextTokens: 4096, turns: 4, queriesPerTurn: 4, observedTokens: 32, seed: 1 },
  'needles-32k': { layers: 1, qHeads: 32, kvHeads: 8, headDim: 128, contextTokens: 32768, turns: 8, queriesPerTurn: 8, observedTokens: 64, seed: 1 },
};

const ROPE_THETA = 10000;
/** Lag-1 correlation of keys and values along positions. */
const SMOOTHNESS = 0.8;
/** Large-magnitude channels per head: this many slowest RoPE pairs get a constant offset. */
const OUTLIER_PAIRS = 2;
const OUTLIER_MAGNITUDE = 8;
/** Logit (after scaling) of the sink token for an ordinary query, and of a needle for its query. */
const SINK_LOGIT = 6;
const NEEDLE_LOGIT = 24;

/** mulberry32 plus Box-Muller: same seed, same numbers on every platform. */
class Random {
  readonly uniform: () => number;
  #spare: number | null = null;

  constructor(seed: number) {
    this.uniform = mulberry32(seed);
  }

  normal(): number {
    if (this.#spare !== null) {
      const value = this.#spare;
      this.#spare = null;
      return value;
    }
    const radius = Math.sqrt(-2 * Math.log(1 - this.uniform()));
    const angle = 2 * Math.PI * this.uniform();
    this.#spare = radius * Math.sin(angle);
    return radius * Math.cos(angle);
  }

  integer(below: number): number {
    return Math.floor(this.uniform() * below);
  }
}

/** Rotates each adjacent pair (2i, 2i+1) of one head vector by position * theta^(-2i/headDim). */
function rope(row: Float32Array, offset: number, headDim: number, position: number): void {
  for (let i = 0; i < headDim / 2; i++) {
    const angle = position * Math.pow(ROPE_THETA, (-2 * i) / headDim);
    const cos = Math.cos(angle), sin = Math.sin(angle);
    const a = row[offset + 2 * i], b = row[offset + 2 * i + 1];
    row[offset + 2 * i] = a * cos - b * sin;
    row[offset + 2 * i + 1] = a * sin + b * cos;
  }
}

function unit(random: Random, length: number): Float64Array {
  const out = new Float64Array(length);
  let norm = 0;
  for (let i = 0; i < length; i++) norm += (out[i] = random.normal()) ** 2;
  norm = Math.sqrt(norm);
  for (let i = 0; i < length; i++) out[i] /= norm;
  return out;
}

/**
 * Generates a named workload (see {@link WORKLOADS}) or a custom spec. Deterministic: the same
 * spec and seed give the same tensors. Throws `ERR_OPTION` for an unknown name.
 */
export function generateWorkload(nameOrSpec: string | WorkloadSpec, seed?: number): EvalSource {
  const known = typeof nameOrSpec !== 'string' || Object.hasOwn(WORKLOADS, nameOrSpec);
  const spec = typeof nameOrSpec === 'string' ? WORKLOADS[nameOrSpec] : nameOrSpec;
  if (!known || spec === undefined) {
    throw new KVSlimError('ERR_OPTION', `Expected a workload name (${Object.keys(WORKLOADS).join(', ')}) but received '${String(nameOrSpec)}'`);
  }
  const { layers, qHeads, kvHeads, headDim, contextTokens, turns, queriesPerTurn, observedTokens } = spec;
  const usedSeed = seed ?? spec.seed;
  const needleCount = turns * queriesPerTurn;
  if (headDim % 2 !== 0 || headDim < 2 * (OUTLIER_PAIRS + 1)) throw new KVSlimError('ERR_OPTION', `workload headDim must be even and >= ${2 * (OUTLIER_PAIRS + 1)}`);
  if (contextTokens < 2 * needleCount + observedTokens + 2) throw new KVSlimError('ERR_OPTION', `workload contextTokens (${contextTokens}) too small for ${needleCount} needles`);
  const random = new Random(usedSeed);
  const scale = 1 / Math.sqrt(headDim);
  const group = qHeads / kvHeads;
  const queryTokens = turns * queriesPerTurn;
  const total = contextTokens + queryTokens;
  // Query dims: the outlier pairs are the last ones (slowest rotation); queries leave them at zero
  // so the outliers shift every score of a query alike (what softmax ignores) instead of adding noise.
  const freeDims = headDim - 2 * OUTLIER_PAIRS;

  // Needles: distinct positions away from the sink and from the observed window.
  const positions = new Set<number>();
  while (positions.size < needleCount) positions.add(1 + random.integer(contextTokens - observedTokens - 1));
  const needlePositions = [...positions];
  const needles: Needle[] = needlePositions.map((position, i) => ({ position, turn: Math.floor(i / queriesPerTurn), query: i % queriesPerTurn }));

  const layerData = Array.from({ length: layers }, () => {
    const k = new Float32Array(total * kvHeads * headDim);
    const v = new Float32Array(total * kvHeads * headDim);
    const q = new Float32Array((observedTokens + queryTokens) * qHeads * headDim);
    // Per kv head: the sink direction (post-RoPE, in the free dims) and outlier offsets.
    const sinkDirection = Array.from({ length: kvHeads }, () => unit(random, freeDims));
    const outliers = Array.from({ length: kvHeads }, () => Array.from({ length: 2 * OUTLIER_PAIRS }, () => (random.uniform() < 0.5 ? -1 : 1) * OUTLIER_MAGNITUDE));
    const keyState = new Float64Array(kvHeads * headDim);
    const valueState = new Float64Array(kvHeads * headDim);
    const innovation = Math.sqrt(1 - SMOOTHNESS * SMOOTHNESS);
    for (let t = 0; t < total; t++) {
      for (let h = 0; h < kvHeads; h++) {
        const base = (t * kvHeads + h) * headDim;
        for (let d = 0; d < headDim; d++) {
          const s = h * headDim + d;
          keyState[s] = t === 0 ? random.normal() : SMOOTHNESS * keyState[s] + innovation * random.normal();
          valueState[s] = t === 0 ? random.normal() : SMOOTHNESS * valueState[s] + innovation * random.normal();
          k[base + d] = keyState[s];
          v[base + d] = valueState[s];
        }
        for (let d = 0; d < 2 * OUTLIER_PAIRS; d++) k[base + freeDims + d] += outliers[h][d];
        rope(k, base, headDim, t);
        if (t === 0) {
          // The sink: a key along the shared query direction (post-RoPE: position 0 is unrotated).
          for (let d = 0; d < freeDims; d++) k[base + d] = sinkDirection[h][d] * Math.sqrt(freeDims);
        }
      }
    }
    // Needles: a key drawn afresh (ordinary in distribution, but unlike its smooth neighbours, whose
    // correlated keys would otherwise compete for the needle's query) and a distinctive value.
    for (const { position } of needles) {
      for (let h = 0; h < kvHeads; h++) {
        const base = (position * kvHeads + h) * headDim;
        for (let d = 0; d < freeDims; d++) k[base + d] = random.normal();
        for (let d = 0; d < 2 * OUTLIER_PAIRS; d++) k[base + freeDims + d] = outliers[h][d] + random.normal();
        rope(k, base, headDim, position);
        const direction = unit(random, headDim);
        for (let d = 0; d < headDim; d++) v[base + d] = direction[d] * 4 * Math.sqrt(headDim);
      }
    }
    // Queries: a shared component towards the sink plus noise; a needle's query adds the needle key's
    // direction (its free dims, post-RoPE) with a logit margin that dominates the context.
    const sinkWeight = SINK_LOGIT / (scale * Math.sqrt(freeDims));
    const writeQuery = (row: number, needle: number | null) => {
      for (let head = 0; head < qHeads; head++) {
        const h = Math.floor(head / group);
        const base = (row * qHeads + head) * headDim;
        for (let d = 0; d < freeDims; d++) q[base + d] = sinkWeight * sinkDirection[h][d] + random.normal();
        if (needle === null) continue;
        const keyBase = (needle * kvHeads + h) * headDim;
        let norm = 0;
        for (let d = 0; d < freeDims; d++) norm += k[keyBase + d] ** 2;
        const weight = NEEDLE_LOGIT / (scale * norm);
        for (let d = 0; d < freeDims; d++) q[base + d] = weight * k[keyBase + d] + 0.25 * random.normal();
      }
    };
    for (let row = 0; row < observedTokens; row++) writeQuery(row, null);
    for (let i = 0; i < queryTokens; i++) writeQuery(observedTokens + i, needles[i].position);
    return { k, v, q };
  });

  const kvRow = kvHeads * headDim;
  const qRow = qHeads * headDim;
  return {
    name: typeof nameOrSpec === 'string' ? nameOrSpec : 'custom',
    config: { layers, qHeads, kvHeads, headDim },
    contextTokens,
    context: layerData.map(({ k, v }) => ({ k: k.subarray(0, contextTokens * kvRow), v: v.subarray(0, contextTokens * kvRow) })),
    observed: layerData.map(({ q }) => q.subarray(0, observedTokens * qRow)),
    observedTokens,
    turns: Array.from({ length: turns }, (_, turn) => {
      const first = turn * queriesPerTurn;
      const rows = (data: Float32Array, row: number, offset: number) => data.subarray((offset + first) * row, (offset + first + queriesPerTurn) * row);
      return {
        layers: layerData.map(({ k, v, q }) => ({ q: rows(q, qRow, observedTokens), k: rows(k, kvRow, contextTokens), v: rows(v, kvRow, contextTokens) })),
        needles: needles.slice(first, first + queriesPerTurn).map((needle) => needle.position),
      };
    }),
    seed: usedSeed,
  };
}
