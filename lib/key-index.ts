// createKeyIndex(): the retrieval indexes of policy.select 'retrieval' as a standalone object, for
// measuring recall and latency on any vectors (the bench's index table) or for custom retrieval.
import { describe, KVSlimError } from './errors.js';
import { addon, type NativeKeyIndex } from './native.js';
import { resolveIndex, type IndexSpec } from './select.js';
import { optionError, plainObject, knownKeys } from './validate.js';

export interface KeyIndexOptions extends IndexSpec {
  /** 'flat' (exact scan), 'ivf' (k-means lists) or 'graph' (attention-aware, RoarGraph-style). */
  kind: 'flat' | 'ivf' | 'graph';
  /** Vector length. */
  dim: number;
  /** Keys, `[n, dim]` row-major. */
  keys: Float32Array;
  /** Training queries `[m, dim]` (graph: the queries the index will serve, e.g. prefill queries). */
  queries?: Float32Array;
  /**
   * ivf, graph: how the index stores its copy of the keys: 'f32' (default) or 'f16' (half the bytes;
   * keys are rounded to f16, so keys that are f16 values already score exactly as with 'f32').
   */
  keyType?: 'f32' | 'f16';
}

export interface SearchOptions {
  /** ivf: lists scanned (default: the index's probes). */
  probes?: number;
  /** graph: candidate list size (default: the index's beam). */
  beam?: number;
}

export interface SearchHits {
  /** Key ids (insertion order), best first. */
  ids: Uint32Array;
  /** max over the query rows of q.k, same order. */
  scores: Float32Array;
  /** Keys whose score was computed. */
  scanned: number;
}

/** Maximum-inner-product index over keys; a search scores a key by the best of its query rows. */
export class KeyIndex {
  readonly kind: 'flat' | 'ivf' | 'graph';
  readonly dim: number;
  /** Milliseconds the build took. */
  readonly buildMs: number;
  #native: NativeKeyIndex | null;

  constructor(options: KeyIndexOptions) {
    const o = plainObject('options', options);
    knownKeys('options', o, ['kind', 'dim', 'keys', 'queries', 'lists', 'probes', 'degree', 'beam', 'neighbors', 'threads', 'seed', 'keyType']);
    if (o.kind !== 'flat' && o.kind !== 'ivf' && o.kind !== 'graph') {
      throw optionError(`Expected 'flat', 'ivf' or 'graph' for options.kind but received ${describe(o.kind)}`);
    }
    if (typeof o.dim !== 'number' || !Number.isInteger(o.dim) || o.dim < 1 || o.dim > 4096) {
      throw optionError(`Expected an integer in [1, 4096] for options.dim but received ${describe(o.dim)}`);
    }
    if (!(o.keys instanceof Float32Array)) throw new KVSlimError('ERR_DTYPE', `Expected a Float32Array for options.keys but received ${describe(o.keys)}`);
    if (o.queries !== undefined && !(o.queries instanceof Float32Array)) {
      throw new KVSlimError('ERR_DTYPE', `Expected a Float32Array for options.queries but received ${describe(o.queries)}`);
    }
    if (o.keyType !== undefined && o.keyType !== 'f32' && o.keyType !== 'f16') {
      throw optionError(`Expected 'f32' or 'f16' for options.keyType but received ${describe(o.keyType)}`);
    }
    if (o.keyType === 'f16' && o.kind === 'flat') {
      throw optionError(`options.keyType 'f16' is supported by the ivf and graph indexes, not 'flat'`);
    }
    const resolved = { ...resolveIndex('options', o.kind, o), halfKeys: o.keyType === 'f16' };
    this.kind = o.kind;
    this.dim = o.dim;
    const start = performance.now();
    this.#native = new addon.NativeKeyIndex({ ...resolved, dim: o.dim }, o.keys, o.queries as Float32Array | undefined);
    this.buildMs = performance.now() - start;
  }

  /** Keys held. */
  get size(): number { return this.#live().size(); }
  /** Host bytes: keys plus structure. */
  get bytes(): number { return this.#live().bytes(); }

  /** Appends keys `[n, dim]`; their ids continue from `size`. */
  add(keys: Float32Array): void {
    if (!(keys instanceof Float32Array)) throw new KVSlimError('ERR_DTYPE', `Expected a Float32Array for keys but received ${describe(keys)}`);
    this.#live().add(keys);
  }

  /** The `k` keys of highest max over the query rows (`[rows, dim]`) of q.k. */
  search(queries: Float32Array, k: number, options: SearchOptions = {}): SearchHits {
    if (!(queries instanceof Float32Array)) throw new KVSlimError('ERR_DTYPE', `Expected a Float32Array for queries but received ${describe(queries)}`);
    if (!Number.isInteger(k) || k < 1 || k > 2 ** 31 - 1) throw optionError(`Expected a positive integer for k but received ${describe(k)}`);
    const o = plainObject('options', options);
    knownKeys('options', o, ['probes', 'beam']);
    const count = (name: 'probes' | 'beam') => {
      const value = o[name];
      if (value === undefined) return 0;
      if (typeof value !== 'number' || !Number.isInteger(value) || value < 1 || value > 2 ** 30) {
        throw optionError(`Expected a positive integer for options.${name} but received ${describe(value)}`);
      }
      return value;
    };
    return this.#live().search(queries, k, count('probes'), count('beam'));
  }

  /** Frees the index; later calls throw ERR_DISPOSED. */
  dispose(): void {
    this.#native?.dispose();
    this.#native = null;
  }

  #live(): NativeKeyIndex {
    if (this.#native === null) throw new KVSlimError('ERR_DISPOSED', 'The index was disposed');
    return this.#native;
  }
}

/** Builds a key index (same as `new KeyIndex(options)`). */
export function createKeyIndex(options: KeyIndexOptions): KeyIndex {
  return new KeyIndex(options);
}

export interface PageBoundsOptions {
  /** Keys `[n, dim]`, in pages of `pageSize` consecutive rows (the last may be partial). */
  keys: Float32Array;
  /** Query rows `[rows, dim]` (a kv head's group); a page's bound is the max over them. */
  queries: Float32Array;
  dim: number;
  /** Default 16. */
  pageSize?: number;
}

/**
 * Quest's upper bound of every page: sum_i max(q_i * min_i, q_i * max_i) over the page's
 * per-channel key minima and maxima, never below the page's best q.k. What policy.select 'quest'
 * ranks pages by.
 */
export function pageBounds(options: PageBoundsOptions): Float32Array {
  const o = plainObject('options', options);
  knownKeys('options', o, ['keys', 'queries', 'dim', 'pageSize']);
  if (!(o.keys instanceof Float32Array)) throw new KVSlimError('ERR_DTYPE', `Expected a Float32Array for options.keys but received ${describe(o.keys)}`);
  if (!(o.queries instanceof Float32Array)) throw new KVSlimError('ERR_DTYPE', `Expected a Float32Array for options.queries but received ${describe(o.queries)}`);
  const pageSize = o.pageSize ?? 16;
  if (typeof pageSize !== 'number' || !Number.isInteger(pageSize) || pageSize < 1 || pageSize > 2 ** 30) {
    throw optionError(`Expected a positive integer for options.pageSize but received ${describe(pageSize)}`);
  }
  if (typeof o.dim !== 'number' || !Number.isInteger(o.dim) || o.dim < 1 || o.dim > 4096) {
    throw optionError(`Expected an integer in [1, 4096] for options.dim but received ${describe(o.dim)}`);
  }
  return addon.pageBounds(o.dim, pageSize, o.keys, o.queries);
}
