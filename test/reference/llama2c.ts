// Float64 reference of the llama2.c forward pass (karpathy/llama2.c run.c): the spec the
// lib/models/llama2c runner is tested against. No cache: every call recomputes the whole sequence.
// Checkpoint layout (legacy format): 7 int32 header fields (dim, hidden_dim, n_layers, n_heads,
// n_kv_heads, vocab_size, seq_len), then f32 weights in the order read below; matrices are
// [out, in]. A positive vocab_size means the classifier is the token embedding.
import { referenceAttention } from './attention.js';

export interface ReferenceModel {
  dim: number;
  hiddenDim: number;
  layers: number;
  heads: number;
  kvHeads: number;
  vocabSize: number;
  seqLen: number;
  weights: Record<'embedding' | 'rmsAtt' | 'wq' | 'wk' | 'wv' | 'wo' | 'rmsFfn' | 'w1' | 'w2' | 'w3' | 'rmsFinal' | 'wcls', Float64Array>;
}

/** Parses a legacy llama2.c checkpoint into float64 weights. */
export function loadReferenceModel(bytes: Uint8Array): ReferenceModel {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const [dim, hiddenDim, layers, heads, kvHeads, vocab, seqLen] = [0, 1, 2, 3, 4, 5, 6].map((i) => view.getInt32(4 * i, true));
  const vocabSize = Math.abs(vocab);
  const kvDim = (kvHeads * dim) / heads;
  let offset = 28;
  const take = (count: number) => {
    const out = new Float64Array(count);
    for (let i = 0; i < count; i++) out[i] = view.getFloat32(offset + 4 * i, true);
    offset += 4 * count;
    return out;
  };
  const embedding = take(vocabSize * dim);
  const rmsAtt = take(layers * dim);
  const wq = take(layers * dim * dim);
  const wk = take(layers * kvDim * dim);
  const wv = take(layers * kvDim * dim);
  const wo = take(layers * dim * dim);
  const rmsFfn = take(layers * dim);
  const w1 = take(layers * hiddenDim * dim);
  const w2 = take(layers * dim * hiddenDim);
  const w3 = take(layers * hiddenDim * dim);
  const rmsFinal = take(dim);
  take(seqLen * (dim / heads)); // the legacy RoPE tables (cos and sin halves); RoPE is computed below
  const wcls = vocab > 0 ? embedding : take(vocabSize * dim);
  return {
    dim, hiddenDim, layers, heads, kvHeads, vocabSize, seqLen,
    weights: { embedding, rmsAtt, wq, wk, wv, wo, rmsFfn, w1, w2, w3, rmsFinal, wcls },
  };
}

/** Row-major `[rows, inDim]` times the transpose of matrix `index` of a stack of `[outDim, inDim]`. */
function linear(x: Float64Array, stack: Float64Array, index: number, rows: number, inDim: number, outDim: number): Float64Array {
  const base = index * outDim * inDim;
  const y = new Float64Array(rows * outDim);
  for (let r = 0; r < rows; r++) {
    for (let o = 0; o < outDim; o++) {
      let sum = 0;
      for (let i = 0; i < inDim; i++) sum += stack[base + o * inDim + i] * x[r * inDim + i];
      y[r * outDim + o] = sum;
    }
  }
  return y;
}

/** x / sqrt(mean(x^2) + 1e-5) * weight, per row. */
function rmsnorm(x: Float64Array, stack: Float64Array, index: number, rows: number, dim: number): Float64Array {
  const y = new Float64Array(rows * dim);
  for (let r = 0; r < rows; r++) {
    let squares = 0;
    for (let i = 0; i < dim; i++) squares += x[r * dim + i] ** 2;
    const scale = 1 / Math.sqrt(squares / dim + 1e-5);
    for (let i = 0; i < dim; i++) y[r * dim + i] = x[r * dim + i] * scale * stack[index * dim + i];
  }
  return y;
}

/** RoPE on adjacent pairs: (x[2i], x[2i+1]) of each head rotated by position * 10000^(-2i/headDim). */
function rope(x: Float64Array, rows: number, heads: number, headDim: number): void {
  for (let position = 0; position < rows; position++) {
    for (let h = 0; h < heads; h++) {
      for (let i = 0; i < headDim; i += 2) {
        const angle = position * 10000 ** (-i / headDim);
        const at = (position * heads + h) * headDim + i;
        const [even, odd] = [x[at], x[at + 1]];
        x[at] = even * Math.cos(angle) - odd * Math.sin(angle);
        x[at + 1] = even * Math.sin(angle) + odd * Math.cos(angle);
      }
    }
  }
}

/** Logits `[tokens.length, vocab]`: row t predicts the token after tokens[0..t] (positions from 0). */
export function referenceForward(model: ReferenceModel, tokens: readonly number[]): Float64Array {
  const { dim, hiddenDim, layers, heads, kvHeads, vocabSize, weights: w } = model;
  const n = tokens.length;
  const headDim = dim / heads;
  const kvDim = kvHeads * headDim;
  const x = new Float64Array(n * dim);
  tokens.forEach((token, t) => x.set(w.embedding.subarray(token * dim, (token + 1) * dim), t * dim));

  for (let l = 0; l < layers; l++) {
    const h = rmsnorm(x, w.rmsAtt, l, n, dim);
    const q = linear(h, w.wq, l, n, dim, dim);
    const k = linear(h, w.wk, l, n, dim, kvDim);
    const v = linear(h, w.wv, l, n, dim, kvDim);
    rope(q, n, heads, headDim);
    rope(k, n, kvHeads, headDim);
    const attended = referenceAttention({ q, k, v, qHeads: heads, kvHeads, headDim, causal: true });
    const projected = linear(attended, w.wo, l, n, dim, dim);
    for (let i = 0; i < x.length; i++) x[i] += projected[i];

    const g = rmsnorm(x, w.rmsFfn, l, n, dim);
    const gate = linear(g, w.w1, l, n, dim, hiddenDim);
    const up = linear(g, w.w3, l, n, dim, hiddenDim);
    const hidden = gate.map((value, i) => (value / (1 + Math.exp(-value))) * up[i]);
    const down = linear(hidden, w.w2, l, n, hiddenDim, dim);
    for (let i = 0; i < x.length; i++) x[i] += down[i];
  }
  return linear(rmsnorm(x, w.rmsFinal, 0, n, dim), w.wcls, 0, n, dim, vocabSize);
}
