import type { Device } from './backends.js';
import { addon } from './native.js';
import {
  type Dtype, knownKeys, oneOf, optionError, plainObject, positiveInteger, positiveNumber,
  outputArray, rowsOf, sharedDtype, type Tensor,
} from './validate.js';
import { KVSlimError } from './errors.js';

/** Options of the stateless {@link attention}. */
export interface AttentionOptions {
  /** Queries `[n, qHeads, headDim]`. */
  q: Tensor;
  /** Keys `[T, kvHeads, headDim]`. */
  k: Tensor;
  /** Values `[T, kvHeads, headDim]`. */
  v: Tensor;
  qHeads: number;
  /** Key/value heads; `qHeads` must be a multiple (GQA: head h reads kv head floor(h / group)). */
  kvHeads: number;
  headDim: number;
  /** Query i of n attends keys `0 ..= T - n + i` (default true). */
  causal?: boolean;
  /** Softmax scale (default `1 / sqrt(headDim)`). */
  scale?: number;
  /** Element type of q, k and v: `f32` (Float32Array, the default) or `f16` / `bf16` (Uint16Array). */
  dtype?: Dtype;
  /** Default `auto`. */
  device?: Device;
  /** Threads to use, at most the pool size (default: the whole pool). */
  threads?: number;
  /** Write the result here (`n * qHeads * headDim` floats, no overlap with q/k/v) instead of a new array. */
  out?: Float32Array;
}

const attentionKeys = ['q', 'k', 'v', 'qHeads', 'kvHeads', 'headDim', 'causal', 'scale', 'dtype', 'device', 'threads', 'out'] as const;

/**
 * Exact softmax attention `softmax(q k^T * scale) v`, computed online (no `[n, T]` score matrix).
 * @returns `[n, qHeads, headDim]` as float32.
 */
export function attention(options: AttentionOptions): Float32Array {
  const o = plainObject('attention options', options);
  knownKeys('attention', o, attentionKeys);
  const qHeads = positiveInteger('qHeads', o.qHeads);
  const kvHeads = positiveInteger('kvHeads', o.kvHeads);
  const headDim = positiveInteger('headDim', o.headDim, 1024);
  if (qHeads % kvHeads !== 0) {
    throw optionError(`Expected qHeads to be a multiple of kvHeads but received qHeads=${qHeads}, kvHeads=${kvHeads}`);
  }
  const dtype = sharedDtype({ q: o.q, k: o.k, v: o.v }, o.dtype);
  const q = o.q as Tensor, k = o.k as Tensor, v = o.v as Tensor;
  const n = rowsOf('q', q, qHeads, headDim, 'qHeads');
  const tokens = rowsOf('k', k, kvHeads, headDim, 'kvHeads');
  if (v.length !== k.length) {
    throw new KVSlimError('ERR_SHAPE', `Expected v to hold as many elements as k (${k.length}) but received ${v.length}`);
  }
  const causal = o.causal === undefined ? true : o.causal;
  if (typeof causal !== 'boolean') throw optionError(`Expected a boolean for causal but received ${typeof causal}`);
  if (causal && n > tokens) {
    throw new KVSlimError('ERR_SHAPE', `Causal attention needs at least as many keys as queries, but received n=${n} queries and T=${tokens} keys`);
  }
  return addon.attention({
    q, k, v, dtype, qHeads, kvHeads, headDim, causal,
    scale: o.scale === undefined ? 0 : positiveNumber('scale', o.scale),
    device: o.device === undefined ? 'auto' : oneOf('device', o.device, ['auto', 'cpu', 'cuda'] as const),
    threads: o.threads === undefined ? 0 : positiveInteger('threads', o.threads, 1024),
    out: outputArray(o.out, q.length, { q, k, v }),
  });
}

/** Options of {@link attentionScores}. */
export interface AttentionScoresOptions {
  /** Queries `[n, qHeads, headDim]`. */
  q: Tensor;
  /** Keys `[T, kvHeads, headDim]`. */
  k: Tensor;
  qHeads: number;
  kvHeads: number;
  headDim: number;
  /** Only the query heads of this kv head (its GQA group); default: every head. */
  kvHead?: number;
  /** Default `1 / sqrt(headDim)`. */
  scale?: number;
  dtype?: Dtype;
  device?: Device;
  threads?: number;
  /**
   * Write the scores here (`n * heads * T` floats, no overlap with q/k) instead of a new array: a
   * tool that scores head after head reuses one buffer instead of faulting in fresh pages each call.
   */
  out?: Float32Array;
}

/**
 * Raw attention scores `q k^T * scale`, no mask and no softmax, for tools that need the attention
 * pattern (head scoring, selection analysis): `[n, heads, T]` float32 with heads = qHeads, or the
 * `qHeads / kvHeads` query heads of `kvHead`. It materializes n x heads x T values: keep n small.
 */
export function attentionScores(options: AttentionScoresOptions): Float32Array {
  const o = plainObject('attentionScores options', options);
  knownKeys('attentionScores', o, ['q', 'k', 'qHeads', 'kvHeads', 'headDim', 'kvHead', 'scale', 'dtype', 'device', 'threads', 'out']);
  const qHeads = positiveInteger('qHeads', o.qHeads);
  const kvHeads = positiveInteger('kvHeads', o.kvHeads);
  const headDim = positiveInteger('headDim', o.headDim, 1024);
  if (qHeads % kvHeads !== 0) {
    throw optionError(`Expected qHeads to be a multiple of kvHeads but received qHeads=${qHeads}, kvHeads=${kvHeads}`);
  }
  const dtype = sharedDtype({ q: o.q, k: o.k }, o.dtype);
  const q = o.q as Tensor, k = o.k as Tensor;
  const n = rowsOf('q', q, qHeads, headDim, 'qHeads');
  const tokens = rowsOf('k', k, kvHeads, headDim, 'kvHeads');
  let kvHead = -1;
  if (o.kvHead !== undefined) {
    if (typeof o.kvHead !== 'number' || !Number.isInteger(o.kvHead) || o.kvHead < 0 || o.kvHead >= kvHeads) {
      throw new KVSlimError('ERR_SHAPE', `Expected kvHead to be an integer in [0, ${kvHeads - 1}] but received ${String(o.kvHead)}`);
    }
    kvHead = o.kvHead;
  }
  const heads = kvHead < 0 ? qHeads : qHeads / kvHeads;
  return addon.attentionScores({
    q, k, dtype, qHeads, kvHeads, headDim, kvHead,
    scale: o.scale === undefined ? 0 : positiveNumber('scale', o.scale),
    device: o.device === undefined ? 'auto' : oneOf('device', o.device, ['auto', 'cpu', 'cuda'] as const),
    threads: o.threads === undefined ? 0 : positiveInteger('threads', o.threads, 1024),
    outCount: n * heads * tokens,
    out: outputArray(o.out, n * heads * tokens, { q, k }, 'n x heads x T'),
  });
}
