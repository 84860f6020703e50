// policy.select (DESIGN.md): which tokens of each layer and kv head stay in the cache. Checked and
// defaulted here; the policies run natively (native/core/select/, one file each).
import { describe } from './errors.js';
import { knownKeys, optionalPositiveInteger, optionError, plainObject } from './validate.js';

/**
 * StreamingLLM: the first `sink` tokens plus the last `window`. A decode step's query attends to the
 * sinks and the last `window` tokens counting itself. A block of n tokens (prefill, or a step of
 * n > 1) first trims the cache to sinks + the last max(window, n) tokens including the block (the
 * reference's evict_for_space), then attends causally, then is trimmed to `window`: query i of a
 * block of n <= window sees window - (n - 1 - i) recent tokens, a longer block attends densely
 * within itself. Keys keep
 * their absolute positions (`positions: 'absolute'`, default); `positions: 'cache'` gives the sink
 * logits the paper's re-numbered positions by rotating the query (needs the cache's `rope`).
 */
export interface StreamingSpec { kind: 'streaming'; sink?: number; window: number; positions?: 'absolute' | 'cache' }
/**
 * SnapKV: at the end of the first prefill, the last `window` prompt queries vote; votes pooled
 * (`kernel`, `pooling`), averaged per kv head; each kv head keeps its top `budget - window` prompt
 * tokens plus the window. Decode tokens are appended after it.
 */
export interface SnapKVSpec { kind: 'snapkv'; budget: number; window?: number; kernel?: number; pooling?: 'max' | 'avg' }
/** PyramidKV: SnapKV with per-layer budgets (an arithmetic sequence, `beta`), the same total. */
export interface PyramidKVSpec {
  kind: 'pyramidkv'; budget: number; beta?: number; window?: number; kernel?: number; pooling?: 'max' | 'avg';
}
/** H2O: `recent` newest tokens plus `budget - recent` heavy hitters (accumulated attention). */
export interface H2OSpec { kind: 'h2o'; budget: number; recent?: number }
/**
 * DuoAttention heads: retrieval heads keep everything, streaming heads `sink` + `window`.
 * `heads`: a mask (booleans or a Uint8Array, `[layers][kvHeads]` or flat) of retrieval heads, or
 * scores (numbers or a Float32Array, e.g. from scoreHeads()), of which either the top
 * `retrievalRatio` (default 0.5 with GQA, 0.25 without) become retrieval heads, ranked across all
 * layers, or, with `threshold` τ, those whose score clipped to [0, 1] is at least τ (Duo's gates:
 * τ = 0.5). `copyHeads` (a mask, e.g. scoreHeadsDetailed()'s) are retrieval heads whatever their
 * rank (methods/duoattention.md: "always OR with R > 0.1"). A streaming head's call of n tokens
 * attends over the sinks, the `window` - 1 tokens before it and the call itself (densely), then is
 * trimmed to `window`: every query sees at least the last `window` tokens counting itself, and a
 * chunked prefill keeps the cached window at each chunk's start, as Duo's deployment does (the
 * cached sink + recent tokens plus the chunk, causal; a first prefill is dense).
 */
export interface DuoSpec {
  kind: 'duo';
  heads: ArrayLike<number> | ArrayLike<boolean> | Array<ArrayLike<number> | ArrayLike<boolean>>;
  sink?: number;
  window?: number;
  retrievalRatio?: number;
  threshold?: number;
  copyHeads?: ArrayLike<number> | ArrayLike<boolean> | Array<ArrayLike<number> | ArrayLike<boolean>>;
}
/**
 * Loading policies keep every token and read a few per decode call: the first `sink` tokens and the
 * last `window` always (the static part, exact), plus those the policy loads from the rest (the
 * dynamic part); the two partial attentions are merged by log-sum-exp. Prefill attends densely.
 */
interface LoadingSpec { sink?: number; window?: number }
/** Quest: pages of `pageSize` tokens with per-channel key min/max; loads the `pages` pages of highest upper bound. */
export interface QuestSpec extends LoadingSpec { kind: 'quest'; pageSize?: number; pages: number }
/** Options of a key index (flat, ivf, graph); see createKeyIndex(). */
export interface IndexSpec {
  /** ivf: k-means lists (default about 4 sqrt(keys)). */
  lists?: number;
  /** ivf: lists scanned per search (default lists / 16). */
  probes?: number;
  /** graph: out-degree cap M (default 32). */
  degree?: number;
  /** graph: search candidate list L (default max(2 topK, 64)). */
  beam?: number;
  /** graph: exact top keys linked per training query, Nq (default 100). */
  neighbors?: number;
  /** Build threads (default: the machine's). */
  threads?: number;
  /** Seed of the build's sampling (default 1). */
  seed?: number;
}
/**
 * RetrievalAttention: the dynamic part through an index per (layer, kv head); each decode call loads
 * the `topK` keys of highest q.k (max over the kv head's query group). `flat` scans exactly (on the
 * backend), `ivf` probes k-means lists, `graph` is the attention-aware index built from a sample of
 * `trainQueries` prefill queries per kv head; keys leaving the window later are inserted.
 */
export interface RetrievalSpec extends LoadingSpec, IndexSpec {
  kind: 'retrieval'; index?: 'flat' | 'ivf' | 'graph'; topK?: number; trainQueries?: number;
}
/**
 * ActQKV: blocks of `blockSize` tokens with representative keys; an activation-aware probe-query from
 * the last `queryWindow` queries scores the blocks (cosine, plus `questionWeight` x the current
 * query); an entropy-driven cut-off shares `blocks` x layers blocks across layers. The
 * representatives (in the store's dtype) and their scoring live on the cache's device; the query
 * statistics and the probe on the host.
 */
export interface ActQKVSpec extends LoadingSpec {
  kind: 'actqkv'; blockSize?: number; blocks?: number; reprTopK?: number; queryWindow?: number;
  questionWeight?: number; temperature?: number;
}
/** Which tokens are kept and loaded. */
export type SelectSpec =
  | { kind: 'full' } | StreamingSpec | SnapKVSpec | PyramidKVSpec | H2OSpec | DuoSpec | QuestSpec | RetrievalSpec | ActQKVSpec;

/** A select spec with every default applied; duo heads flattened (mask or scores). */
export type ResolvedSelect =
  | { kind: 'full' }
  | { kind: 'streaming'; sink: number; window: number; positions: 'absolute' | 'cache' }
  | { kind: 'snapkv' | 'pyramidkv'; budget: number; window: number; kernel: number; pooling: 'max' | 'avg'; beta: number }
  | { kind: 'h2o'; budget: number; recent: number }
  | {
    kind: 'duo'; sink: number; window: number; mask: Uint8Array | null; scores: Float64Array | null;
    retrievalRatio: number | null; threshold: number | null; copyHeads: Uint8Array | null;
    /** Entries per row when `heads` (and `copyHeads`) came as `[layers][kvHeads]`, checked against the cache's shape. */
    rows: number[] | null;
  }
  | { kind: 'quest'; sink: number; window: number; pageSize: number; pages: number }
  | { kind: 'retrieval'; sink: number; window: number; index: ResolvedIndex; topK: number; trainQueries: number }
  | {
    kind: 'actqkv'; sink: number; window: number; blockSize: number; blocks: number; reprTopK: number; queryWindow: number;
    questionWeight: number; temperature: number;
  };

/** Index options with every default applied (0 = chosen at build from the key count). */
export interface ResolvedIndex {
  kind: 'flat' | 'ivf' | 'graph'; lists: number; probes: number; degree: number; beam: number; neighbors: number;
  threads: number; seed: number;
}
const INDEX_KEYS = ['lists', 'probes', 'degree', 'beam', 'neighbors', 'threads', 'seed'];
const MAX_TOKENS = 2 ** 40;

function nonNegativeInteger(name: string, value: unknown, fallback: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > MAX_TOKENS) {
    throw optionError(`Expected a non-negative integer for ${name} but received ${describe(value)}`);
  }
  return value;
}

// Duo's heads (or copyHeads) as one flat list, row by row when given as `[layers][kvHeads]`; a
// Uint8Array (flat or a row) is a mask, a Float32Array or Float64Array scores.
interface FlatHeads { values: Array<number | boolean>; typed: 'mask' | 'scores' | null; rows: number[] | null }

function flatten(name: string, heads: unknown): FlatHeads {
  if (heads instanceof Uint8Array) return { values: Array.from(heads), typed: 'mask', rows: null };
  if (heads instanceof Float32Array || heads instanceof Float64Array) return { values: Array.from(heads), typed: 'scores', rows: null };
  if (!Array.isArray(heads)) throw optionError(`Expected an array, Uint8Array or Float32Array for ${name} but received ${describe(heads)}`);
  const nested = heads.map((entry) => Array.isArray(entry) || ArrayBuffer.isView(entry));
  if (!nested.every((n) => n === nested[0])) {
    throw optionError(`Expected ${name} to be flat or one row per layer, not a mix of rows and entries (entry ${nested.indexOf(!nested[0])})`);
  }
  if (!nested[0]) return { values: heads as Array<number | boolean>, typed: null, rows: null };
  const kinds = new Set<'mask' | 'scores' | null>();
  const values: Array<number | boolean> = [];
  const rows: number[] = [];
  heads.forEach((row: unknown, layer) => {
    if (ArrayBuffer.isView(row) && !(row instanceof Uint8Array || row instanceof Float32Array || row instanceof Float64Array)) {
      throw optionError(`Expected ${name}[${layer}] to be an array, Uint8Array or Float32Array but received ${describe(row)}`);
    }
    kinds.add(row instanceof Uint8Array ? 'mask' : ArrayBuffer.isView(row) ? 'scores' : null);
    const entries = Array.from(row as ArrayLike<number | boolean>);
    for (const entry of entries) {
      if (Array.isArray(entry) || ArrayBuffer.isView(entry)) throw optionError(`Expected ${name}[${layer}] to hold numbers or booleans, not nested arrays`);
    }
    values.push(...entries);
    rows.push(entries.length);
  });
  kinds.delete(null);
  if (kinds.size > 1) throw optionError(`Expected ${name} rows to be all masks (Uint8Array) or all scores, not both`);
  return { values, typed: kinds.size === 1 ? [...kinds][0] : null, rows };
}

// A flat mask (0/1 bytes) from checked entries: booleans, or 0s and 1s of a Uint8Array.
function maskOf(name: string, flat: FlatHeads, what: string): Uint8Array {
  if (flat.typed === 'mask') {
    const bad = flat.values.findIndex((v) => v !== 0 && v !== 1);
    if (bad >= 0) throw optionError(`Expected a Uint8Array mask of 0s and 1s for ${name} but entry ${bad} is ${describe(flat.values[bad])}`);
  } else if (flat.typed === 'scores' || !flat.values.every((v) => typeof v === 'boolean')) {
    throw optionError(`Expected ${name} to be ${what}`);
  }
  return Uint8Array.from(flat.values, (v) => (v ? 1 : 0));
}

// An optional number in [0, 1] (null when absent).
function unitFraction(name: string, value: unknown): number | null {
  if (value === undefined) return null;
  if (typeof value !== 'number' || !(value >= 0 && value <= 1)) throw optionError(`Expected a number in [0, 1] for ${name} but received ${describe(value)}`);
  return value;
}

function sameRows(a: number[] | null, b: number[] | null): boolean {
  return a === null || b === null || (a.length === b.length && a.every((n, i) => n === b[i]));
}

function resolveDuo(s: Record<string, unknown>): ResolvedSelect {
  knownKeys('policy.select', s, ['kind', 'heads', 'sink', 'window', 'retrievalRatio', 'threshold', 'copyHeads']);
  const sink = nonNegativeInteger('policy.select.sink', s.sink, 64);
  const window = optionalPositiveInteger('policy.select.window', s.window, 256, MAX_TOKENS);
  const flat = flatten('policy.select.heads', s.heads);
  const { values, typed } = flat;
  if (values.length === 0) throw optionError(`Expected policy.select.heads to hold one entry per (layer, kv head) but received ${describe(s.heads)}`);
  const booleans = values.every((v) => typeof v === 'boolean');
  const numbers = values.every((v) => typeof v === 'number' && Number.isFinite(v));
  if (!booleans && !numbers) {
    const bad = values.findIndex((v) => typeof v !== typeof values[0] || (typeof v === 'number' && !Number.isFinite(v)));
    throw optionError('Expected policy.select.heads to hold only booleans (a mask) or only finite numbers (scores), ' +
      `but entry ${Math.max(0, bad)} is ${describe(values[Math.max(0, bad)])}`);
  }
  const none = { retrievalRatio: null, threshold: null, copyHeads: null, rows: flat.rows };
  if (typed === 'mask' || booleans) {
    for (const option of ['retrievalRatio', 'threshold', 'copyHeads']) {
      if (s[option] !== undefined) throw optionError(`policy.select.${option} applies to scores, not to a mask of heads`);
    }
    return { kind: 'duo', sink, window, mask: maskOf('policy.select.heads', flat, 'a mask'), scores: null, ...none };
  }
  if (s.retrievalRatio !== undefined && s.threshold !== undefined) {
    throw optionError('policy.select.retrievalRatio and policy.select.threshold are two ways to choose heads from scores: give one');
  }
  const ratio = unitFraction('policy.select.retrievalRatio', s.retrievalRatio);
  const threshold = unitFraction('policy.select.threshold', s.threshold);
  let copyHeads: Uint8Array | null = null;
  if (s.copyHeads !== undefined) {
    const copies = flatten('policy.select.copyHeads', s.copyHeads);
    copyHeads = maskOf('policy.select.copyHeads', copies, 'a mask (booleans or a Uint8Array of 0s and 1s)');
    if (copyHeads.length !== values.length || !sameRows(flat.rows, copies.rows)) {
      throw optionError(`Expected policy.select.copyHeads to have the shape of policy.select.heads (${values.length} entries) ` +
        `but it holds ${copyHeads.length}${copies.rows === null ? '' : ` in rows of ${copies.rows.join(', ')}`}`);
    }
  }
  return { kind: 'duo', sink, window, mask: null, scores: Float64Array.from(values as number[]), retrievalRatio: ratio, threshold, copyHeads, rows: flat.rows };
}

function finiteNumber(name: string, value: unknown, fallback: number, min: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isFinite(value) || value < min) {
    throw optionError(`Expected a finite number >= ${min === Number.MIN_VALUE ? '0 (exclusive)' : min} for ${name} but received ${describe(value)}`);
  }
  return value;
}

// sink and window of a loading policy.
function loadingPart(s: Record<string, unknown>, sink: number, window: number): { sink: number; window: number } {
  return {
    sink: nonNegativeInteger('policy.select.sink', s.sink, sink),
    window: optionalPositiveInteger('policy.select.window', s.window, window, MAX_TOKENS),
  };
}

/** Index options (IndexSpec) checked under `prefix`, defaults applied. */
export function resolveIndex(prefix: string, kind: 'flat' | 'ivf' | 'graph', s: Record<string, unknown>): ResolvedIndex {
  const count = (name: string, fallback: number, max: number) => nonNegativeIntegerUpTo(`${prefix}.${name}`, s[name], fallback, max);
  const degree = count('degree', 32, 1024);
  if (degree < 2) throw optionError(`Expected ${prefix}.degree to be in [2, 1024] but received ${degree}`);
  const neighbors = count('neighbors', 100, 4096);
  if (neighbors < 1) throw optionError(`Expected ${prefix}.neighbors to be in [1, 4096] but received ${neighbors}`);
  return {
    kind, lists: count('lists', 0, 1 << 24), probes: count('probes', 0, 1 << 24), degree, beam: count('beam', 0, 1 << 20),
    neighbors, threads: count('threads', 0, 1024), seed: count('seed', 1, 2 ** 31 - 1),
  };
}

function nonNegativeIntegerUpTo(name: string, value: unknown, fallback: number, max: number): number {
  const result = nonNegativeInteger(name, value, fallback);
  if (result > max) throw optionError(`Expected an integer in [0, ${max}] for ${name} but received ${result}`);
  return result;
}

export function resolveSelect(select: unknown): ResolvedSelect {
  if (select === undefined) return { kind: 'full' };
  const s = plainObject('policy.select', select);
  switch (s.kind) {
    case 'full':
      knownKeys('policy.select', s, ['kind']);
      return { kind: 'full' };
    case 'streaming':
      knownKeys('policy.select', s, ['kind', 'sink', 'window', 'positions']);
      if (s.window === undefined) throw optionError('policy.select.window is required for streaming');
      if (s.positions !== undefined && s.positions !== 'absolute' && s.positions !== 'cache') {
        throw optionError(`Expected 'absolute' or 'cache' for policy.select.positions but received ${describe(s.positions)}`);
      }
      return {
        kind: 'streaming', sink: nonNegativeInteger('policy.select.sink', s.sink, 4),
        window: optionalPositiveInteger('policy.select.window', s.window, 0, MAX_TOKENS),
        positions: s.positions ?? 'absolute',
      };
    case 'snapkv':
    case 'pyramidkv': {
      knownKeys('policy.select', s, ['kind', 'budget', 'window', 'kernel', 'pooling', ...(s.kind === 'pyramidkv' ? ['beta'] : [])]);
      if (s.budget === undefined) throw optionError(`policy.select.budget is required for ${s.kind}`);
      const budget = optionalPositiveInteger('policy.select.budget', s.budget, 0, MAX_TOKENS);
      const window = optionalPositiveInteger('policy.select.window', s.window, 32, MAX_TOKENS);
      if (window >= budget) throw optionError(`Expected policy.select.window (${window}) to be smaller than policy.select.budget (${budget})`);
      const kernel = optionalPositiveInteger('policy.select.kernel', s.kernel, 7, 1023);
      if (kernel % 2 === 0) throw optionError(`Expected an odd policy.select.kernel but received ${kernel}`);
      const pooling = s.pooling === undefined ? 'max' : s.pooling;
      if (pooling !== 'max' && pooling !== 'avg') throw optionError(`Expected 'max' or 'avg' for policy.select.pooling but received ${describe(pooling)}`);
      let beta = 20;
      if (s.beta !== undefined) {
        if (typeof s.beta !== 'number' || !Number.isFinite(s.beta) || s.beta < 1) {
          throw optionError(`Expected a finite number >= 1 for policy.select.beta but received ${describe(s.beta)}`);
        }
        beta = s.beta;
      }
      return { kind: s.kind, budget, window, kernel, pooling, beta };
    }
    case 'h2o': {
      knownKeys('policy.select', s, ['kind', 'budget', 'recent']);
      if (s.budget === undefined) throw optionError('policy.select.budget is required for h2o');
      const budget = optionalPositiveInteger('policy.select.budget', s.budget, 0, MAX_TOKENS);
      if (budget < 2) throw optionError(`Expected policy.select.budget >= 2 for h2o (recent + heavy) but received ${budget}`);
      const recent = optionalPositiveInteger('policy.select.recent', s.recent, Math.floor(budget / 2), MAX_TOKENS);
      if (recent >= budget) throw optionError(`Expected policy.select.recent (${recent}) to be smaller than policy.select.budget (${budget})`);
      return { kind: 'h2o', budget, recent };
    }
    case 'duo':
      return resolveDuo(s);
    case 'quest': {
      knownKeys('policy.select', s, ['kind', 'sink', 'window', 'pageSize', 'pages']);
      if (s.pages === undefined) throw optionError('policy.select.pages is required for quest');
      return {
        kind: 'quest', ...loadingPart(s, 4, 64), pageSize: optionalPositiveInteger('policy.select.pageSize', s.pageSize, 16, MAX_TOKENS),
        pages: optionalPositiveInteger('policy.select.pages', s.pages, 0, MAX_TOKENS),
      };
    }
    case 'retrieval': {
      knownKeys('policy.select', s, ['kind', 'sink', 'window', 'index', 'topK', 'trainQueries', ...INDEX_KEYS]);
      const kind = s.index ?? 'flat';
      if (kind !== 'flat' && kind !== 'ivf' && kind !== 'graph') {
        throw optionError(`Expected 'flat', 'ivf' or 'graph' for policy.select.index but received ${describe(s.index)}`);
      }
      return {
        kind: 'retrieval', ...loadingPart(s, 128, 512), index: resolveIndex('policy.select', kind, s),
        topK: optionalPositiveInteger('policy.select.topK', s.topK, 100, MAX_TOKENS),
        trainQueries: optionalPositiveInteger('policy.select.trainQueries', s.trainQueries, 4096, MAX_TOKENS),
      };
    }
    case 'actqkv': {
      knownKeys('policy.select', s, ['kind', 'sink', 'window', 'blockSize', 'blocks', 'reprTopK', 'queryWindow', 'questionWeight', 'temperature']);
      const blockSize = optionalPositiveInteger('policy.select.blockSize', s.blockSize, 32, 1 << 20);
      const reprTopK = optionalPositiveInteger('policy.select.reprTopK', s.reprTopK, Math.min(4, blockSize), 1 << 20);
      if (reprTopK > blockSize) throw optionError(`Expected policy.select.reprTopK (${reprTopK}) to be at most policy.select.blockSize (${blockSize})`);
      return {
        kind: 'actqkv', ...loadingPart(s, 64, 512), blockSize,
        blocks: optionalPositiveInteger('policy.select.blocks', s.blocks, 46, MAX_TOKENS), reprTopK,
        queryWindow: optionalPositiveInteger('policy.select.queryWindow', s.queryWindow, 256, 1 << 20),
        questionWeight: finiteNumber('policy.select.questionWeight', s.questionWeight, 4, 0),
        temperature: finiteNumber('policy.select.temperature', s.temperature, 0.05, Number.MIN_VALUE),
      };
    }
    default:
      throw optionError(
        `Expected 'full', 'streaming', 'snapkv', 'pyramidkv', 'h2o', 'duo', 'quest', 'retrieval' or 'actqkv' for policy.select.kind but received ${describe(s.kind)}`,
      );
  }
}

/** Duo's share of retrieval heads when scores come without one: half with GQA, a quarter without (methods/duoattention.md). */
export function defaultRetrievalRatio(gqa: boolean): number {
  return gqa ? 0.5 : 0.25;
}

/**
 * The duo retrieval mask `[layers * kvHeads]` for a cache shape: the given mask, or from the scores
 * those at or above `threshold` after clipping to [0, 1], or the top `retrievalRatio` ranked across
 * all layers (ties: the lower index); `copyHeads` are added to either.
 */
export function duoMask(select: Extract<ResolvedSelect, { kind: 'duo' }>, layers: number, kvHeads: number, gqa: boolean): Uint8Array {
  const count = layers * kvHeads;
  const given = select.mask ?? select.scores;
  if (given === null || given.length !== count) {
    throw optionError(`Expected policy.select.heads to hold layers x kvHeads = ${count} entries but it holds ${given?.length ?? 0}`);
  }
  if (select.rows !== null && (select.rows.length !== layers || select.rows.some((n) => n !== kvHeads))) {
    throw optionError(`Expected policy.select.heads to hold ${layers} rows (layers) of ${kvHeads} (kv heads) but its rows hold ${select.rows.join(', ')}`);
  }
  if (select.mask !== null) return select.mask;
  const scores = select.scores as Float64Array;
  const mask = new Uint8Array(count);
  if (select.threshold !== null) {
    const threshold = select.threshold;
    scores.forEach((score, index) => { mask[index] = Math.min(1, Math.max(0, score)) >= threshold ? 1 : 0; });
  } else {
    const ratio = select.retrievalRatio ?? defaultRetrievalRatio(gqa);
    const retrieval = Math.round(ratio * count);
    const order = Array.from({ length: count }, (_, i) => i).sort((a, b) => scores[b] - scores[a] || a - b);
    for (const index of order.slice(0, retrieval)) mask[index] = 1;
  }
  select.copyHeads?.forEach((copy, index) => { mask[index] |= copy; });
  return mask;
}
