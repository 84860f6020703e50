// The synthetic workloads of lib/eval/workload.ts: deterministic, shaped like real caches, and their
// planted needles are what exact attention retrieves at every turn.
import { describe, expect, it } from 'vitest';

import { attention } from '../../lib/attention.js';
import { argmax, attentionProbabilities, needleHit } from '../../lib/eval/metrics.js';
import { generateWorkload } from '../../lib/eval/workload.js';

describe('needles-4k workload', () => {
  const source = generateWorkload('needles-4k');
  const { layers, qHeads, kvHeads, headDim } = source.config;
  const kvRow = kvHeads * headDim, group = qHeads / kvHeads;
  const scale = 1 / Math.sqrt(headDim);

  it('is deterministic from its seed', () => {
    const again = generateWorkload('needles-4k');
    expect(Buffer.from(again.context[1].k.buffer).equals(Buffer.from(source.context[1].k.buffer))).toBe(true);
    expect(again.turns[3].needles).toEqual(source.turns[3].needles);
    const other = generateWorkload('needles-4k', 2);
    expect(other.context[0].k[100]).not.toBe(source.context[0].k[100]);
    expect(() => generateWorkload('needles-1m')).toThrow(/workload name/);
  });

  it('has a sink, large key channels and smooth keys', () => {
    const { k } = source.context[0];
    // Ordinary (observed) queries put a large share of their mass on token 0.
    let sinkMass = 0;
    for (let head = 0; head < qHeads; head++) {
      const probs = attentionProbabilities(source.observed[0], head * headDim, k, kvHeads, Math.floor(head / group), headDim, source.contextTokens, scale);
      sinkMass += probs[0] / qHeads;
    }
    expect(sinkMass).toBeGreaterThan(0.02);
    // Per-channel mean |k|: the outlier channels (the last 4 dims) stand far above the rest.
    const meanAbs = new Float64Array(headDim);
    for (let t = 1; t < source.contextTokens; t++) for (let d = 0; d < headDim; d++) meanAbs[d] += Math.abs(k[t * kvRow + d]) / source.contextTokens;
    const typical = meanAbs.slice(0, headDim - 4).reduce((a, b) => a + b, 0) / (headDim - 4);
    for (let d = headDim - 4; d < headDim; d++) expect(meanAbs[d]).toBeGreaterThan(4 * typical);
    // Neighbouring values are correlated (AR(1) along positions).
    const { v } = source.context[0];
    let lag = 0, zero = 0;
    for (let t = 1; t < 2000; t++) for (let d = 0; d < headDim; d++) {
      lag += v[t * kvRow + d] * v[(t - 1) * kvRow + d];
      zero += v[t * kvRow + d] ** 2;
    }
    expect(lag / zero).toBeGreaterThan(0.5);
  });

  it('plants needles that exact attention retrieves at every turn', () => {
    for (let layer = 0; layer < layers; layer++) {
      // Multi-turn layout: the context, then every turn's tokens in order.
      const turnTokens = source.turns.reduce((sum, t) => sum + t.needles.length, 0);
      const k = new Float32Array((source.contextTokens + turnTokens) * kvRow), v = new Float32Array(k.length);
      k.set(source.context[layer].k);
      v.set(source.context[layer].v);
      let offset = source.contextTokens;
      source.turns.forEach((turn, index) => {
        const data = turn.layers[layer];
        k.set(data.k, offset * kvRow);
        v.set(data.v, offset * kvRow);
        const n = turn.needles.length;
        const out = attention({ q: data.q, k: k.subarray(0, (offset + n) * kvRow), v: v.subarray(0, (offset + n) * kvRow), qHeads, kvHeads, headDim, device: 'cpu' });
        turn.needles.forEach((position, row) => {
          expect(position).not.toBeNull();
          for (let head = 0; head < qHeads; head++) {
            const kvHead = Math.floor(head / group);
            const probs = attentionProbabilities(data.q, (row * qHeads + head) * headDim, k, kvHeads, kvHead, headDim, offset + row + 1, scale);
            expect(argmax(probs), `turn ${index} query ${row} head ${head}`).toBe(position);
            expect(probs[position as number]).toBeGreaterThan(0.5);
            const value = v.subarray(((position as number) * kvHeads + kvHead) * headDim, ((position as number) * kvHeads + kvHead + 1) * headDim);
            expect(needleHit(out.subarray((row * qHeads + head) * headDim, (row * qHeads + head + 1) * headDim), value)).toBe(true);
          }
        });
        offset += n;
      });
    }
  });
});
