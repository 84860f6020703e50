// The head-by-head prefill (native/cpu/attention_prefill_heads.cc) sizes its row tiles by the
// thread count and stages the query rows and outputs head-major (StagedRows). Rows never interact
// and every key block is whole, so a cache on one thread must give the bits of the same cache on
// three, and both the float64 reference (prefill-drivers.test.ts compares staged and unstaged
// rows). Shapes: GQA groups of 4, 3 and 5 (rows per head not a multiple of the register tile),
// head sizes with padding (48, 100, 40), a prompt over an earlier one, f32 and f16 stores, and
// H2O's prompt mass.
import { afterEach, beforeAll, describe, expect, it } from 'vitest';

import { KVCache, backends, setThreads } from '../lib/index.js';
import { ensureCompiled } from './helpers/dist.js';
import { disposedAfterEach, held } from './helpers/lifetime.js';
import { expectIdentical } from './helpers/outputs.js';
import { Random, relativeL2 } from './helpers/random.js';
import { referenceAttention } from './reference/attention.js';
import { roundTo } from './reference/half.js';

// f32 accumulation over a few hundred keys against float64.
const TOLERANCE = 2e-5;

interface Case {
  qHeads: number;
  kvHeads: number;
  headDim: number;
  /** Prompts prefilled one after another. */
  prompts: number[];
  store: 'f32' | 'f16';
}

const CASES: Case[] = [
  { qHeads: 8, kvHeads: 2, headDim: 64, prompts: [300], store: 'f32' },
  { qHeads: 4, kvHeads: 4, headDim: 100, prompts: [277], store: 'f16' },
  { qHeads: 6, kvHeads: 2, headDim: 48, prompts: [150, 141], store: 'f32' },
  { qHeads: 10, kvHeads: 2, headDim: 40, prompts: [257], store: 'f16' },
  { qHeads: 4, kvHeads: 1, headDim: 128, prompts: [70, 1, 520], store: 'f32' },
];

describe('prefill on one thread and on three', () => {
  const open = disposedAfterEach<KVCache>();
  const original = backends().cpu.threads;
  beforeAll(() => ensureCompiled());
  afterEach(() => setThreads(original));

  it.each(CASES.map((c) => [`${c.qHeads}/${c.kvHeads} d${c.headDim} prompts ${c.prompts.join('+')} ${c.store}`, c] as const))(
    '%s: the bits of three threads and the float64 reference', (_, c) => {
      setThreads(3);
      const random = new Random(c.qHeads * 1000 + c.headDim);
      const total = c.prompts.reduce((a, b) => a + b, 0);
      const qRow = c.qHeads * c.headDim, kvRow = c.kvHeads * c.headDim;
      const q = random.tensor(total * qRow), k = random.tensor(total * kvRow), v = random.tensor(total * kvRow);
      const options = { layers: 1, qHeads: c.qHeads, kvHeads: c.kvHeads, headDim: c.headDim, device: 'cpu' as const,
        policy: { store: { kind: c.store } } };
      const one = held(open, new KVCache({ ...options, threads: 1 }));
      const three = held(open, new KVCache({ ...options, threads: 3 }));
      let first = 0;
      for (const n of c.prompts) {
        const end = first + n;
        const args = [q.subarray(first * qRow, end * qRow), k.subarray(first * kvRow, end * kvRow), v.subarray(first * kvRow, end * kvRow)] as const;
        const staged = one.prefill(0, ...args);
        expectIdentical(staged, three.prefill(0, ...args), `prompt ${first}..${end}`);
        const expected = referenceAttention({
          q: q.subarray(first * qRow, end * qRow), k: roundTo(k.subarray(0, end * kvRow), c.store),
          v: roundTo(v.subarray(0, end * kvRow), c.store), qHeads: c.qHeads, kvHeads: c.kvHeads, headDim: c.headDim,
        });
        expect(relativeL2(staged, expected), `prompt ${first}..${end}`).toBeLessThanOrEqual(TOLERANCE);
        first = end;
      }
    });

  it('H2O keeps the same tokens from a one-thread prompt (its mass from the staged rows)', () => {
    setThreads(3);
    const [qHeads, kvHeads, headDim, prompt] = [8, 2, 72, 400];
    const random = new Random(77);
    const q = random.tensor(prompt * qHeads * headDim), k = random.tensor(prompt * kvHeads * headDim), v = random.tensor(prompt * kvHeads * headDim);
    const make = (threads: number) => held(open, new KVCache({ layers: 1, qHeads, kvHeads, headDim, device: 'cpu', threads,
      policy: { select: { kind: 'h2o', budget: 64, recent: 16 } } }));
    const one = make(1), three = make(3);
    expectIdentical(one.prefill(0, q, k, v), three.prefill(0, q, k, v), 'h2o prompt output');
    for (let h = 0; h < kvHeads; h++) {
      expect(one.positions(0, h), `kv head ${h}`).toEqual(three.positions(0, h));
      expect(one.positions(0, h)).toHaveLength(64);
    }
  });
});
