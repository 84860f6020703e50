// Float64 reference of exact softmax attention: the spec the kernels are tested against.
// Tensors are row-major: q [n, qHeads, headDim], k and v [T, kvHeads, headDim] (DESIGN.md).
// GQA: query head h reads kv head floor(h / group). Causal: query i of n attends keys <= T - n + i.

export interface ReferenceAttentionInput {
  q: ArrayLike<number>;
  k: ArrayLike<number>;
  v: ArrayLike<number>;
  qHeads: number;
  kvHeads: number;
  headDim: number;
  /** Default true. */
  causal?: boolean;
  /** Default 1 / sqrt(headDim). */
  scale?: number;
}

/** softmax(q k^T * scale) v per query row and head, as float64 `[n, qHeads, headDim]`. */
export function referenceAttention(input: ReferenceAttentionInput): Float64Array {
  const { q, k, v, qHeads, kvHeads, headDim } = input;
  const causal = input.causal ?? true;
  const scale = input.scale ?? 1 / Math.sqrt(headDim);
  const group = qHeads / kvHeads;
  const n = q.length / (qHeads * headDim);
  const tokens = k.length / (kvHeads * headDim);
  const out = new Float64Array(n * qHeads * headDim);
  const scores = new Float64Array(tokens);

  for (let i = 0; i < n; i++) {
    const last = causal ? tokens - n + i : tokens - 1;
    for (let h = 0; h < qHeads; h++) {
      const kvHead = Math.floor(h / group);
      const qBase = (i * qHeads + h) * headDim;

      // Scores and their maximum (subtracted before exp so nothing overflows).
      let max = -Infinity;
      for (let j = 0; j <= last; j++) {
        const kBase = (j * kvHeads + kvHead) * headDim;
        let dot = 0;
        for (let d = 0; d < headDim; d++) dot += q[qBase + d] * k[kBase + d];
        scores[j] = dot * scale;
        if (scores[j] > max) max = scores[j];
      }

      // Weighted sum of values, normalised by the sum of weights.
      let sum = 0;
      const outBase = (i * qHeads + h) * headDim;
      for (let j = 0; j <= last; j++) {
        const weight = Math.exp(scores[j] - max);
        sum += weight;
        const vBase = (j * kvHeads + kvHead) * headDim;
        for (let d = 0; d < headDim; d++) out[outBase + d] += weight * v[vBase + d];
      }
      for (let d = 0; d < headDim; d++) out[outBase + d] /= sum;
    }
  }
  return out;
}
