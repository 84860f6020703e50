// Fidelity measures of lib/eval/metrics.ts against values worked out by hand.
import { describe, expect, it } from 'vitest';

import {
  argmax, attentionProbabilities, cosine, massRecall, NEEDLE_COSINE, needleHit, outputFidelity, summarize, topkRecall,
} from '../../lib/eval/metrics.js';

describe('eval metrics', () => {
  it('measures relative L2 and cosine per head vector, averaged', () => {
    // Two head vectors of headDim 2: the first exact, the second off by (0, 1) from (3, 4).
    const exact = new Float32Array([1, 0, 3, 4]);
    const out = new Float32Array([1, 0, 3, 5]);
    const { relL2Mean, cosineMean } = outputFidelity(out, exact, 2);
    expect(relL2Mean).toBeCloseTo((0 + 1 / 5) / 2, 12);
    expect(cosineMean).toBeCloseTo((1 + (9 + 20) / (5 * Math.sqrt(34))) / 2, 12);
    expect(cosine([1, 0], [0, 1])).toBe(0);
  });

  it('computes exact softmax probabilities, mass recall and top-k recall', () => {
    // q = (ln 2 * sqrt 2, 0), scale 1/sqrt 2: scores ln 2, 0, 0 -> probabilities 1/2, 1/4, 1/4.
    const q = new Float32Array([Math.LN2 * Math.SQRT2, 0]);
    const k = new Float32Array([1, 0, 0, 1, 0, 0]);
    const probs = attentionProbabilities(q, 0, k, 1, 0, 2, 3, Math.SQRT1_2);
    expect(Array.from(probs).map((p) => Number(p.toFixed(6)))).toEqual([0.5, 0.25, 0.25]);
    expect(argmax(probs)).toBe(0);
    expect(massRecall(probs, null)).toBe(1);
    expect(massRecall(probs, new Set([0, 2]))).toBeCloseTo(0.75, 6);
    expect(topkRecall(probs, new Set([1]), 2)).toBe(0.5);
    expect(topkRecall(probs, null)).toBe(1);
  });

  it('calls a needle hit when its value dominates the output', () => {
    expect(needleHit([1.25, 2], [1, 2])).toBe(true);
    expect(needleHit([2, -1], [1, 2])).toBe(false);
  });

  it('edge cases: zero head vectors, ties, k past the tokens, kept positions past the keys, a cosine of exactly 0.5', () => {
    // An exact head vector of zeros: any nonzero output is an infinite relative error and cosine 0;
    // a zero output there is exact (error 0, cosine 1).
    expect(outputFidelity(new Float32Array([1, 0, 3, 4]), new Float32Array([0, 0, 3, 4]), 2)).toEqual({ relL2Mean: Infinity, cosineMean: 0.5 });
    expect(outputFidelity(new Float32Array([0, 0, 3, 4]), new Float32Array([0, 0, 3, 4]), 2)).toEqual({ relL2Mean: 0, cosineMean: 1 });
    // argmax: the first of equal maxima.
    expect(argmax([1, 3, 3, 2])).toBe(1);
    expect(argmax(new Float64Array([0.25, 0.5, 0.25, 0.5]))).toBe(1);
    // Probabilities 1/2, 1/4, 1/4 (scores ln 2, 0, 0): top-k with k past the 3 tokens counts all 3.
    const probs = new Float64Array([0.5, 0.25, 0.25]);
    expect(topkRecall(probs, new Set([0, 1, 2]))).toBe(1);
    expect(topkRecall(probs, new Set([0]), 5)).toBe(1 / 3);
    // A kept position past the probabilities (a token the query cannot see) adds no mass.
    expect(massRecall(probs, new Set([0, 7]))).toBe(0.5);
    // cos((1, 1, 1, 1), (1, 0, 0, 0)) = 1 / 2 exactly: a hit (the threshold is inclusive).
    expect(cosine([1, 1, 1, 1], [1, 0, 0, 0])).toBe(NEEDLE_COSINE);
    expect(needleHit([1, 1, 1, 1], [1, 0, 0, 0])).toBe(true);
    expect(needleHit([1, 1, 1, 1.5], [1, 0, 0, 0])).toBe(false);
  });

  it('summarizes step times by mean, median and p99', () => {
    expect(summarize([4, 1, 3, 2])).toEqual({ mean: 2.5, p50: 2, p99: 4 });
    expect(summarize([])).toEqual({ mean: 0, p50: 0, p99: 0 });
  });
});
