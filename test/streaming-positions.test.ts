// StreamingLLM 'cache' positions (methods/streaming.md): the sink logits see the query rotated by
// (its cache slot - its absolute position), the window logits the query as is; keys are never
// re-rotated. Checked against a float64 reference that rotates the query and merges both parts.
import { describe, expect, it } from 'vitest';

import { KVCache, KVSlimError } from '../lib/index.js';
import { Random, relativeL2 } from './helpers/random.js';
import { type Heads, randomTokens } from './helpers/tokens.js';
import { disposedAfterEach } from './helpers/lifetime.js';
import { roundTo } from './reference/half.js';

const open = disposedAfterEach<KVCache>();

type Style = 'adjacent' | 'half';

/** x rotated by `delta` positions (float64). */
function rotate(x: ArrayLike<number>, delta: number, theta: number, style: Style): Float64Array {
  const d = x.length, pairs = d / 2, out = Float64Array.from(x);
  for (let i = 0; i < pairs; i++) {
    const angle = delta * theta ** (-2 * i / d);
    const a = style === 'adjacent' ? 2 * i : i, b = style === 'adjacent' ? 2 * i + 1 : i + pairs;
    out[a] = x[a] * Math.cos(angle) - x[b] * Math.sin(angle);
    out[b] = x[a] * Math.sin(angle) + x[b] * Math.cos(angle);
  }
  return out;
}

/** One decode query at absolute position P over sinks (rotated query) and the window (query as is). */
function reference(q: Float32Array, keys: Float64Array, values: Float64Array, heads: Heads, sinks: number[], window: number[],
  P: number, theta: number, style: Style): Float64Array {
  const { qHeads, kvHeads, headDim } = heads, group = qHeads / kvHeads, scale = 1 / Math.sqrt(headDim);
  const out = new Float64Array(qHeads * headDim);
  const slot = sinks.length + window.length - 1;
  for (let h = 0; h < qHeads; h++) {
    const kv = Math.floor(h / group);
    const plain = q.subarray(h * headDim, (h + 1) * headDim);
    const turned = rotate(plain, slot - P, theta, style);
    const tokens = [...sinks.map((t) => ({ t, query: turned })), ...window.map((t) => ({ t, query: plain }))];
    const scores = tokens.map(({ t, query }) => {
      let dot = 0;
      for (let d = 0; d < headDim; d++) dot += query[d] * keys[(t * kvHeads + kv) * headDim + d];
      return dot * scale;
    });
    const max = Math.max(...scores);
    const weights = scores.map((s) => Math.exp(s - max));
    const total = weights.reduce((a, b) => a + b, 0);
    tokens.forEach(({ t }, j) => {
      for (let d = 0; d < headDim; d++) out[h * headDim + d] += (weights[j] / total) * values[(t * kvHeads + kv) * headDim + d];
    });
  }
  return out;
}

describe("streaming positions: 'cache'", () => {
  const cases: Array<{ heads: Heads; sink: number; window: number; style: Style; theta: number }> = [
    { heads: { qHeads: 8, kvHeads: 2, headDim: 64 }, sink: 4, window: 16, style: 'adjacent', theta: 10000 },
    { heads: { qHeads: 4, kvHeads: 4, headDim: 32 }, sink: 2, window: 9, style: 'half', theta: 500 },
  ];
  for (const [index, c] of cases.entries()) {
    it(`${c.heads.qHeads}/${c.heads.kvHeads}/${c.heads.headDim}, sink ${c.sink}, window ${c.window}, ${c.style}`, () => {
      const random = new Random(9100 + index);
      const cache = new KVCache({
        layers: 1, ...c.heads, device: 'cpu', pageTokens: 4, rope: { theta: c.theta, style: c.style },
        policy: { select: { kind: 'streaming', sink: c.sink, window: c.window, positions: 'cache' } },
      });
      const absolute = new KVCache({
        layers: 1, ...c.heads, device: 'cpu', pageTokens: 4, policy: { select: { kind: 'streaming', sink: c.sink, window: c.window } },
      });
      open.push(cache, absolute);
      const T = 60;
      const all = randomTokens(random, c.heads, T);
      const kvRow = c.heads.kvHeads * c.heads.headDim, qRow = c.heads.qHeads * c.heads.headDim;
      const keys = roundTo(all.k, 'f16'), values = roundTo(all.v, 'f16');
      let differs = 0;
      for (let t = 0; t < T; t++) {
        const q = all.q.subarray(t * qRow, (t + 1) * qRow);
        const k = all.k.subarray(t * kvRow, (t + 1) * kvRow), v = all.v.subarray(t * kvRow, (t + 1) * kvRow);
        const out = cache.step(0, q, k, v);
        const plain = absolute.step(0, q, k, v);
        const windowStart = Math.max(0, t - c.window + 1);
        const sinks = Array.from({ length: Math.min(c.sink, windowStart) }, (_, i) => i);
        const window = Array.from({ length: t - windowStart + 1 }, (_, i) => windowStart + i);
        const expected = reference(q, keys, values, c.heads, sinks, window, t, c.theta, c.style);
        expect(relativeL2(out, expected), `t ${t}`).toBeLessThanOrEqual(1e-4);
        // Absolute positions never rotate; once sinks are split off, the two modes differ.
        const unrotated = reference(q, keys, values, c.heads, sinks, window, sinks.length + window.length - 1, c.theta, c.style);
        expect(relativeL2(plain, unrotated), `t ${t} absolute`).toBeLessThanOrEqual(1e-4);
        if (relativeL2(out, plain) > 1e-3) differs++;
      }
      expect(differs).toBeGreaterThan(T / 2);
    });
  }

  it("needs a rope option and a streaming policy", () => {
    let thrown: unknown;
    try {
      open.push(new KVCache({ layers: 1, qHeads: 2, kvHeads: 1, headDim: 16, policy: { select: { kind: 'streaming', window: 8, positions: 'cache' } } }));
    } catch (error) {
      thrown = error;
    }
    expect(thrown).toBeInstanceOf(KVSlimError);
    expect((thrown as KVSlimError).code).toBe('ERR_OPTION');
    expect((thrown as KVSlimError).message).toMatch(/rope/);
  });
});
