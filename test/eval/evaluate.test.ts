// The evaluation runner (lib/eval/evaluate.ts) on a case small enough to work out by hand, and its
// argument checks.
import { describe, expect, it } from 'vitest';

import { evaluate } from '../../lib/eval/evaluate.js';
import type { EvalSource } from '../../lib/eval/workload.js';

// One layer, one head, headDim 2; context keys e0, e1 with values (1, 2), (3, 4). Each turn is one
// token with key and value 0 whose query scores the first key ln 2 (scale 1/sqrt 2) and the rest 0.
// Multi-turn, turn 1 sees 3 keys: weights 2:1:1 -> out (2*(1,2) + (3,4)) / 4 = (1.25, 2).
// Multi-turn, turn 2 sees 4 keys: weights 2:1:1:1 -> out (5, 8) / 5 = (1, 1.6).
// Multi-request: every turn sees 3 keys -> (1.25, 2).
function handCase(): EvalSource {
  const turn = () => ({ layers: [{ q: new Float32Array([Math.LN2 * Math.SQRT2, 0]), k: new Float32Array(2), v: new Float32Array(2) }], needles: [0] });
  return {
    name: 'hand', config: { layers: 1, qHeads: 1, kvHeads: 1, headDim: 2 }, contextTokens: 2,
    context: [{ k: new Float32Array([1, 0, 0, 1]), v: new Float32Array([1, 2, 3, 4]) }],
    observed: [new Float32Array(0)], observedTokens: 0, turns: [turn(), turn()], seed: null,
  };
}

describe('evaluate', () => {
  it('reports memory, fidelity and needles of a hand-computed case (multi-turn)', () => {
    const [full, f32] = evaluate({ source: handCase(), policies: [{}, { store: { kind: 'f32' } }], mode: 'multi-turn' });
    expect(full).toMatchObject({
      schema: 'scbench-report/1', mode: 'multi-turn', task: 'hand', contextTokens: 2,
      model: { layers: 1, qHeads: 1, kvHeads: 1, headDim: 2, kvDtype: 'f16' },
      method: { name: 'full', kvClass: 'O(n)', params: {} },
    });
    expect(f32.method.name).toBe('full/f32');
    const [turn1, turn2] = full.turns;
    // 3 then 4 tokens of K and V, 2 elements each, 2 bytes (f16) each.
    expect(turn1.memory).toMatchObject({ kvBytesFull: 24, kvBytesHost: 24, kvBytesDevice: 0, retainedTokens: 3, retainedRatio: 1 });
    expect(turn2.memory).toMatchObject({ kvBytesFull: 32, kvBytesHost: 32, retainedTokens: 4 });
    expect(turn1.memory.compressionRatio).toBeCloseTo((24 + turn1.memory.metaBytes) / 24, 12);
    expect(f32.turns[0].memory).toMatchObject({ kvBytesFull: 24, kvBytesHost: 48 });
    for (const report of [full, f32]) {
      for (const turn of report.turns) {
        expect(turn.fidelity.attnOutRelL2Mean).toBeLessThan(1e-3);
        expect(turn.fidelity.attnOutCosineMean).toBeGreaterThan(0.999999);
        expect(turn.fidelity).toMatchObject({ taskScore: 1, taskScoreFull: 1, needleArgmaxRate: 1, attnMassRecallMean: 1, topkRecallMean: 1 });
        expect(turn).toMatchObject({ queryTokens: 1, genTokens: 1 });
      }
    }
    expect(turn1.latencyMs.prefill).toBeGreaterThan(0);
    expect(turn2.latencyMs.prefill).toBe(0);
    expect(full.summary).toMatchObject({ scoreMean: 1, scoreFullMean: 1 });
    expect(full.summary.prefillMs).toBe(turn1.latencyMs.prefill);
  });

  it('forks the unchanged context per request in multi-request mode', () => {
    const [report] = evaluate({ source: handCase(), policies: [{ store: { kind: 'f32' } }], mode: 'multi-request' });
    expect(report.turns.map((t) => t.memory.retainedTokens)).toEqual([3, 3]);
    expect(report.turns.map((t) => t.memory.kvBytesHost)).toEqual([48, 48]);
    expect(report.summary.attnOutRelL2Mean).toBeLessThan(1e-6);
  });

  it('detects a wrong output: a source whose reference differs from the cache', () => {
    // The reference is exact attention on the f32 data; a bf16 store of values that bf16 rounds
    // shows a small but nonzero error.
    const source = handCase();
    source.context[0].v.set([1.001, 2.003, 3.007, 4.011]);
    const [report] = evaluate({ source, policies: [{ store: { kind: 'bf16' } }], turns: 1 });
    expect(report.turns).toHaveLength(1);
    expect(report.summary.attnOutRelL2Mean).toBeGreaterThan(1e-4);
    expect(report.summary.attnOutRelL2Mean).toBeLessThan(1e-2);
  });

  it('runs a named workload and rejects bad options before any work', () => {
    const reports = evaluate({ source: 'needles-4k', policies: [{ store: { kind: 'bf16' } }], turns: 2, mode: 'multi-request' });
    expect(reports[0].turns.map((t) => t.fidelity.taskScore)).toEqual([1, 1]);
    expect(reports[0].turns[0].memory.retainedTokens).toBe(4096 + 4);
    expect(reports[0].turns[1].memory.retainedTokens).toBe(4096 + 4);
    expect(() => evaluate({ source: 'needles-4k', turns: 5 })).toThrow(/turns to be an integer in \[1, 4\]/);
    expect(() => evaluate({ source: 'nope' })).toThrow(/workload name/);
    expect(() => evaluate({ source: 'needles-4k', policies: [{ summary: { kind: 'sse' } } as never] })).toThrow(/not available/);
    expect(() => evaluate({ source: 'needles-4k', policies: [{ select: { kind: 'snapkv' } } as never] })).toThrow(/budget is required/);
    expect(() => evaluate({ source: 'needles-4k', mode: 'both' as never })).toThrow(/multi-turn/);
  });

  it('measures a loading policy on what its last call loaded', () => {
    const select = { kind: 'retrieval', index: 'flat', topK: 64, sink: 4, window: 64 } as const;
    const [full, flat] = evaluate({ source: 'needles-4k', policies: [{}, { select }], turns: 1 });
    expect(flat.method.name).toBe('flat:64');
    const turn = flat.turns[0];
    // Every token stays: the bytes are the full cache's, the exact top-64 find the needle.
    expect(turn.memory.retainedTokens).toBe(full.turns[0].memory.retainedTokens);
    expect(turn.fidelity.taskScore).toBe(1);
    // 132 of ~4100 tokens loaded: some attention mass is missed, little of it.
    expect(turn.fidelity.attnMassRecallMean).toBeLessThan(1);
    expect(turn.fidelity.attnMassRecallMean).toBeGreaterThan(0.9);
    expect(turn.fidelity.attnOutRelL2Mean).toBeLessThan(0.05);
    expect(flat.method.stage).toBe('loading');
  });
});
