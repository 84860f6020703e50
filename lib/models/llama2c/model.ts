// The Llama 2 forward pass of llama2.c (run.c), in float32, with attention done by a kvslim KVCache:
//   x = embedding[token]
//   per layer:  h = rmsnorm(x) ; q, k, v = Wq h, Wk h, Wv h ; rotate q, k (RoPE, adjacent pairs)
//               x += Wo attention(q, cache + (k, v))          <- KVCache.prefill / KVCache.step
//               h = rmsnorm(x) ; x += W2 (silu(W1 h) * W3 h)  (SwiGLU)
//   logits = Wcls rmsnorm(x)
// The cache holds post-RoPE keys, so whatever it stores (f32, f16, bf16, later compressed) the
// model code is the same, and a sequence's position is simply the number of tokens cached.
import { KVCache, type KVCacheOptions, KVSlimError } from '../../index.js';
import type { Checkpoint, ModelConfig, Weights } from './checkpoint.js';

/** RMSNorm's epsilon in llama2.c. */
const RMS_EPSILON = 1e-5;

/** One layer's attention inputs and output for a block of n tokens (post-RoPE q and k). */
export interface AttentionTensors {
  /** `[n, heads, headDim]`. */
  q: Float32Array;
  /** `[n, kvHeads, headDim]`. */
  k: Float32Array;
  /** `[n, kvHeads, headDim]`. */
  v: Float32Array;
  /** `[n, heads, headDim]`: what the cache returned. */
  out: Float32Array;
}

export interface ForwardOptions {
  /** Return logits for every token of the block, `[n, vocab]`, instead of the last one, `[vocab]`. */
  allLogits?: boolean;
  /** Sees each layer's attention tensors (valid during the call; copy to keep them). */
  observe?: (layer: number, tensors: AttentionTensors) => void;
}

/** Cache options a model decides itself; the caller picks the rest (policy, device, threads). */
export type ModelCacheOptions = Omit<KVCacheOptions, 'layers' | 'qHeads' | 'kvHeads' | 'headDim' | 'scale'>;

/** y[t, o] = sum_i w[o, i] x[t, i] for n rows: `x` `[n, inDim]`, `w` `[outDim, inDim]`. */
function matmul(x: Float32Array, w: Float32Array, n: number, inDim: number, outDim: number): Float32Array {
  const y = new Float32Array(n * outDim);
  for (let t = 0; t < n; t++) {
    const xBase = t * inDim;
    for (let o = 0; o < outDim; o++) {
      const wBase = o * inDim;
      let sum = 0;
      for (let i = 0; i < inDim; i++) sum += w[wBase + i] * x[xBase + i];
      y[t * outDim + o] = sum;
    }
  }
  return y;
}

/** Each row of `x` `[n, dim]` divided by its root mean square, times `weight`. */
function rmsnorm(x: Float32Array, weight: Float32Array, n: number, dim: number): Float32Array {
  const y = new Float32Array(n * dim);
  for (let t = 0; t < n; t++) {
    let squares = 0;
    for (let i = 0; i < dim; i++) squares += x[t * dim + i] ** 2;
    const inverse = 1 / Math.sqrt(squares / dim + RMS_EPSILON);
    for (let i = 0; i < dim; i++) y[t * dim + i] = weight[i] * x[t * dim + i] * inverse;
  }
  return y;
}

/** Row `index` of a stack of equal-sized matrices. */
function slice(stack: Float32Array, index: number, size: number): Float32Array {
  return stack.subarray(index * size, (index + 1) * size);
}

export class Llama2 {
  readonly config: ModelConfig;
  readonly #weights: Weights;
  /** cos and sin of position x frequency, `[seqLen, headDim / 2]`, in float64. */
  readonly #cos: Float64Array;
  readonly #sin: Float64Array;

  /** A model over a checkpoint's weights (shared, not copied). RoPE base `ropeTheta`, default 10000. */
  constructor(checkpoint: Checkpoint, options: { ropeTheta?: number } = {}) {
    this.config = checkpoint.config;
    this.#weights = checkpoint.weights;
    const { seqLen, headDim } = this.config;
    const theta = options.ropeTheta ?? 10000;
    const pairs = headDim / 2;
    this.#cos = new Float64Array(seqLen * pairs);
    this.#sin = new Float64Array(seqLen * pairs);
    for (let position = 0; position < seqLen; position++) {
      for (let pair = 0; pair < pairs; pair++) {
        const angle = position * theta ** (-(2 * pair) / headDim);
        this.#cos[position * pairs + pair] = Math.cos(angle);
        this.#sin[position * pairs + pair] = Math.sin(angle);
      }
    }
  }

  /** A KVCache shaped for this model (layers, heads, kvHeads, headDim); options add policy, device, threads. */
  createCache(options: ModelCacheOptions = {}): KVCache {
    const { layers, heads, kvHeads, headDim } = this.config;
    return new KVCache({ ...options, layers, qHeads: heads, kvHeads, headDim });
  }

  /**
   * Runs `tokens` (n >= 1 ids) through the model after the tokens `cache` already holds, appends
   * their keys and values to it, and returns logits: `[vocab]` for the last token, or `[n, vocab]`
   * with `allLogits`. One token goes through `cache.step`, a block through `cache.prefill`.
   * Throws `ERR_VALUE` for an id outside the vocabulary, `ERR_SHAPE` past the model's context
   * (seqLen), `ERR_OPTION` for a cache of another shape; the cache is unchanged then.
   */
  forward(cache: KVCache, tokens: ArrayLike<number>, options: ForwardOptions = {}): Float32Array {
    const { dim, hiddenDim, layers, heads, kvHeads, headDim, vocabSize, seqLen } = this.config;
    if (cache.layers !== layers || cache.qHeads !== heads || cache.kvHeads !== kvHeads || cache.headDim !== headDim) {
      throw new KVSlimError(
        'ERR_OPTION',
        `Expected a cache of ${layers} layers, ${heads}/${kvHeads} heads, headDim ${headDim} (model.createCache()) but received ` +
          `${cache.layers} layers, ${cache.qHeads}/${cache.kvHeads} heads, headDim ${cache.headDim}`,
      );
    }
    const n = tokens.length;
    const position = cache.tokens(0);
    if (n < 1) throw new KVSlimError('ERR_SHAPE', 'Expected at least one token');
    if (position + n > seqLen) {
      throw new KVSlimError('ERR_SHAPE', `The model's context is ${seqLen} tokens; the cache holds ${position} and ${n} more do not fit`);
    }
    for (let t = 0; t < n; t++) {
      if (!Number.isInteger(tokens[t]) || tokens[t] < 0 || tokens[t] >= vocabSize) {
        throw new KVSlimError('ERR_VALUE', `Expected token ids in [0, ${vocabSize - 1}] but tokens[${t}] is ${String(tokens[t])}`);
      }
    }

    const w = this.#weights;
    const kvDim = kvHeads * headDim;
    const x = new Float32Array(n * dim);
    for (let t = 0; t < n; t++) x.set(slice(w.tokenEmbedding, tokens[t], dim), t * dim);

    for (let layer = 0; layer < layers; layer++) {
      const h = rmsnorm(x, slice(w.rmsAtt, layer, dim), n, dim);
      const q = matmul(h, slice(w.wq, layer, dim * dim), n, dim, dim);
      const k = matmul(h, slice(w.wk, layer, kvDim * dim), n, dim, kvDim);
      const v = matmul(h, slice(w.wv, layer, kvDim * dim), n, dim, kvDim);
      this.#rope(q, n, heads, position);
      this.#rope(k, n, kvHeads, position);
      const out = n === 1 ? cache.step(layer, q, k, v) : cache.prefill(layer, q, k, v);
      options.observe?.(layer, { q, k, v, out });
      const attended = matmul(out, slice(w.wo, layer, dim * dim), n, dim, dim);
      for (let i = 0; i < x.length; i++) x[i] += attended[i];

      const g = rmsnorm(x, slice(w.rmsFfn, layer, dim), n, dim);
      const gate = matmul(g, slice(w.w1, layer, hiddenDim * dim), n, dim, hiddenDim);
      const up = matmul(g, slice(w.w3, layer, hiddenDim * dim), n, dim, hiddenDim);
      for (let i = 0; i < gate.length; i++) gate[i] = (gate[i] / (1 + Math.exp(-gate[i]))) * up[i]; // silu(gate) * up
      const down = matmul(gate, slice(w.w2, layer, dim * hiddenDim), n, hiddenDim, dim);
      for (let i = 0; i < x.length; i++) x[i] += down[i];
    }

    const first = options.allLogits ? 0 : n - 1;
    const rows = n - first;
    const final = rmsnorm(x.subarray(first * dim), w.rmsFinal, rows, dim);
    return matmul(final, w.wcls, rows, dim, vocabSize);
  }

  /** Rotates adjacent pairs (x[2i], x[2i+1]) of each head by position x theta^(-2i/headDim), in place. */
  #rope(x: Float32Array, n: number, heads: number, position: number): void {
    const { headDim } = this.config;
    const pairs = headDim / 2;
    for (let t = 0; t < n; t++) {
      const table = (position + t) * pairs;
      for (let head = 0; head < heads; head++) {
        const base = (t * heads + head) * headDim;
        for (let pair = 0; pair < pairs; pair++) {
          const cos = this.#cos[table + pair];
          const sin = this.#sin[table + pair];
          const even = x[base + 2 * pair];
          const odd = x[base + 2 * pair + 1];
          x[base + 2 * pair] = even * cos - odd * sin;
          x[base + 2 * pair + 1] = even * sin + odd * cos;
        }
      }
    }
  }
}
