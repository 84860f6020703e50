// The peer every kvslim figure is compared with: attention as a Node user writes it without
// kvslim. Plain loops on one thread over Float32Array data (JS arithmetic is f64), a two-pass
// max-subtracted softmax with Math.exp, then the weighted sum of values. It always reads f32 keys
// and values. Written for clarity, not tuned; it doubles as the reference of the correctness check.

/** One attention problem in kvslim's layout (DESIGN.md, Conventions). */
export interface BaselineProblem {
  /** Queries `[rows, qHeads, headDim]`. */
  q: Float32Array;
  /** Keys `[>= tokens, kvHeads, headDim]`; only positions up to the largest query position are read. */
  k: Float32Array;
  /** Values, laid out like the keys. */
  v: Float32Array;
  qHeads: number;
  kvHeads: number;
  headDim: number;
  /** Absolute position of each query row: row i attends keys `0 ..= positions[i]` (causal). */
  positions: number[];
}

/** Exact softmax attention with scale 1/sqrt(headDim); returns `[rows, qHeads, headDim]`. */
export function attentionPlainJS(problem: BaselineProblem): Float32Array {
  const { q, k, v, qHeads, kvHeads, headDim, positions } = problem;
  const group = qHeads / kvHeads;
  const scale = 1 / Math.sqrt(headDim);
  const tokenStride = kvHeads * headDim;
  const out = new Float32Array(positions.length * qHeads * headDim);
  const scores = new Float64Array(positions.reduce((a, b) => Math.max(a, b), 0) + 1);
  const sum = new Float64Array(headDim);
  for (let row = 0; row < positions.length; row++) {
    const keys = positions[row] + 1;
    for (let head = 0; head < qHeads; head++) {
      const qOffset = (row * qHeads + head) * headDim;
      const kvOffset = Math.floor(head / group) * headDim;
      let max = -Infinity;
      for (let t = 0; t < keys; t++) {
        const kOffset = t * tokenStride + kvOffset;
        let dot = 0;
        for (let d = 0; d < headDim; d++) dot += q[qOffset + d] * k[kOffset + d];
        dot *= scale;
        scores[t] = dot;
        if (dot > max) max = dot;
      }
      let total = 0;
      for (let t = 0; t < keys; t++) {
        const weight = Math.exp(scores[t] - max);
        scores[t] = weight;
        total += weight;
      }
      sum.fill(0);
      for (let t = 0; t < keys; t++) {
        const weight = scores[t] / total;
        const vOffset = t * tokenStride + kvOffset;
        for (let d = 0; d < headDim; d++) sum[d] += weight * v[vOffset + d];
      }
      for (let d = 0; d < headDim; d++) out[qOffset + d] = sum[d];
    }
  }
  return out;
}

/** ||actual - expected|| / ||expected|| over all elements. */
export function relativeL2Error(actual: Float32Array, expected: Float32Array): number {
  if (actual.length !== expected.length) return Infinity;
  let diff = 0, norm = 0;
  for (let i = 0; i < expected.length; i++) {
    const e = actual[i] - expected[i];
    diff += e * e;
    norm += expected[i] * expected[i];
  }
  return Math.sqrt(diff / norm);
}
