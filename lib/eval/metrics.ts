// Fidelity measures of `evaluate` (SCBench-style, see the scbench method spec (methods/scbench.md)): a policy's
// attention output against exact attention, per query token and query head, in float64.

/** Cosine at or above which a needle's value is said to dominate an attention output. */
export const NEEDLE_COSINE = 0.5;

/** The k of top-k recall. */
export const TOP_K = 32;

/** Output fidelity of `[rows, qHeads, headDim]` outputs, averaged over rows x heads. */
export interface OutputFidelity {
  /** Mean over heads of ||out - exact|| / ||exact||. */
  relL2Mean: number;
  /** Mean over heads of cos(out, exact). */
  cosineMean: number;
}

/** Relative L2 error and cosine per head vector of `out` against `exact`, averaged. */
export function outputFidelity(out: Float32Array, exact: Float32Array, headDim: number): OutputFidelity {
  if (out.length !== exact.length || exact.length % headDim !== 0) throw new RangeError(`outputFidelity: lengths ${out.length} and ${exact.length} (headDim ${headDim})`);
  const vectors = exact.length / headDim;
  let relL2 = 0, cosine = 0;
  for (let i = 0; i < vectors; i++) {
    let diff = 0, dot = 0, normOut = 0, normExact = 0;
    for (let d = i * headDim; d < (i + 1) * headDim; d++) {
      diff += (out[d] - exact[d]) ** 2;
      dot += out[d] * exact[d];
      normOut += out[d] ** 2;
      normExact += exact[d] ** 2;
    }
    relL2 += normExact > 0 ? Math.sqrt(diff / normExact) : Math.sqrt(diff) > 0 ? Infinity : 0;
    cosine += normOut > 0 && normExact > 0 ? dot / Math.sqrt(normOut * normExact) : normOut === normExact ? 1 : 0;
  }
  return { relL2Mean: relL2 / vectors, cosineMean: cosine / vectors };
}

/** cos(a, b) of two equal-length vectors (0 when either is zero). */
export function cosine(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let dot = 0, normA = 0, normB = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    normA += a[i] ** 2;
    normB += b[i] ** 2;
  }
  return normA > 0 && normB > 0 ? dot / Math.sqrt(normA * normB) : 0;
}

/**
 * Exact softmax probabilities of one query head over keys `0 .. tokens-1` of kv head `kvHead`
 * (`k` is `[T, kvHeads, headDim]`), in float64.
 */
export function attentionProbabilities(
  q: Float32Array, qOffset: number, k: Float32Array, kvHeads: number, kvHead: number, headDim: number, tokens: number, scale: number,
): Float64Array {
  const probs = new Float64Array(tokens);
  let max = -Infinity;
  for (let t = 0; t < tokens; t++) {
    const base = (t * kvHeads + kvHead) * headDim;
    let dot = 0;
    for (let d = 0; d < headDim; d++) dot += q[qOffset + d] * k[base + d];
    const score = dot * scale;
    probs[t] = score;
    if (score > max) max = score;
  }
  let sum = 0;
  for (let t = 0; t < tokens; t++) sum += probs[t] = Math.exp(probs[t] - max);
  for (let t = 0; t < tokens; t++) probs[t] /= sum;
  return probs;
}

/** Index of the largest element (the first on ties). */
export function argmax(values: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

/** Exact softmax mass on the kept tokens (`kept` null: every token is kept, mass 1). */
export function massRecall(probs: Float64Array, kept: ReadonlySet<number> | null): number {
  if (kept === null) return 1;
  let mass = 0;
  for (const t of kept) if (t < probs.length) mass += probs[t];
  return mass;
}

/** |kept ∩ exact top-k| / k, with k = min(TOP_K, tokens) (`kept` null: 1). */
export function topkRecall(probs: Float64Array, kept: ReadonlySet<number> | null, k = TOP_K): number {
  if (kept === null) return 1;
  const count = Math.min(k, probs.length);
  const top = Array.from(probs.keys()).sort((a, b) => probs[b] - probs[a]).slice(0, count);
  return top.filter((t) => kept.has(t)).length / count;
}

/** True when the needle's value dominates the output vector: cos(out, value) >= {@link NEEDLE_COSINE}. */
export function needleHit(out: ArrayLike<number>, needleValue: ArrayLike<number>): boolean {
  return cosine(out, needleValue) >= NEEDLE_COSINE;
}

/** Mean, median and 99th percentile (nearest rank) of a sample; zeros when empty. */
export function summarize(sample: readonly number[]): { mean: number; p50: number; p99: number } {
  if (sample.length === 0) return { mean: 0, p50: 0, p99: 0 };
  const sorted = [...sample].sort((a, b) => a - b);
  const rank = (p: number) => sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(p * sorted.length) - 1))];
  return { mean: sample.reduce((a, b) => a + b, 0) / sample.length, p50: rank(0.5), p99: rank(0.99) };
}
