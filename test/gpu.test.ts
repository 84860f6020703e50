// The CUDA backend (native/cuda/) against the CPU path and the float64 reference, on the shapes of
// attention.test.ts, and a KVCache living on the GPU. Runs on a GPU host with `npm run test:gpu`
// (KVSLIM_TEST_DEVICE=cuda); elsewhere only the CPU-side checks at the bottom run.
import { afterEach, describe, expect, it } from 'vitest';

import { KVCache, backends } from '../lib/index.js';
import { ATTENTION_CASES, compareAttention, label } from './helpers/attention-cases.js';
import { Random, relativeL2, rows } from './helpers/random.js';
import { type Heads, LayerMirror, randomTokens, sliceTokens } from './helpers/tokens.js';

// GPU kernels also compute in f32 (in a different order, possibly with fast exp2): the same bound
// as the CPU against the reference, and the same between the two devices.
const TOLERANCE = 2e-5;
const onGpu = process.env.KVSLIM_TEST_DEVICE === 'cuda';

const open: KVCache[] = [];
afterEach(() => {
  for (const cache of open.splice(0)) cache.dispose();
});

describe.runIf(onGpu)('CUDA: attention()', () => {
  it('CUDA is built and a GPU answers', () => {
    const cuda = backends().cuda;
    expect(cuda, 'this build has no CUDA backend').not.toBeNull();
    expect(cuda?.available, cuda?.reason).toBe(true);
  });

  let seed = 50_000;
  for (const group of ATTENTION_CASES) {
    describe(group.title, () => {
      for (const { shape, dtypes } of group.cases) {
        for (const dtype of dtypes) {
          const caseSeed = seed++;
          it(label(shape, dtype), () => {
            const { outputs, relative } = compareAttention(shape, dtype, caseSeed, ['cuda', 'cpu']);
            expect(relative[0], 'cuda vs reference').toBeLessThanOrEqual(TOLERANCE);
            expect(relative[1], 'cpu vs reference').toBeLessThanOrEqual(TOLERANCE);
            expect(relativeL2(outputs[0], outputs[1]), 'cuda vs cpu').toBeLessThanOrEqual(TOLERANCE);
          });
        }
      }
    });
  }
});

describe.runIf(onGpu)('CUDA: KVCache', () => {
  const heads: Heads = { qHeads: 8, kvHeads: 2, headDim: 128 };
  const qRow = heads.qHeads * heads.headDim;
  const gpuCache = (options: { layers?: number; pageTokens?: number; store?: 'f32' | 'f16' | 'bf16' } = {}) => {
    const cache = new KVCache({
      layers: options.layers ?? 1, ...heads, device: 'cuda', pageTokens: options.pageTokens,
      policy: { store: { kind: options.store ?? 'f16' } },
    });
    open.push(cache);
    return cache;
  };

  for (const store of ['f16', 'bf16', 'f32'] as const) {
    it(`store ${store}: step-by-step decode equals one prefill, and the reference`, () => {
      const random = new Random(60_000 + store.length);
      const layers = 2, count = 120;
      const prefilled = gpuCache({ layers, pageTokens: 16, store });
      const stepped = gpuCache({ layers, pageTokens: 16, store });
      expect(prefilled.device).toBe('cuda');
      for (let layer = 0; layer < layers; layer++) {
        const tokens = randomTokens(random, heads, count);
        const mirror = new LayerMirror(heads, store);
        mirror.append(tokens.k, tokens.v);
        const prefillOut = prefilled.prefill(layer, tokens.q, tokens.k, tokens.v);
        expect(relativeL2(prefillOut, mirror.attend(tokens.q))).toBeLessThanOrEqual(TOLERANCE);
        for (let t = 0; t < count; t++) {
          const token = sliceTokens(tokens, heads, t, 1);
          const out = stepped.step(layer, token.q, token.k, token.v);
          expect(relativeL2(out, rows(prefillOut, qRow, t, 1)), `layer ${layer} step ${t}`).toBeLessThanOrEqual(TOLERANCE);
        }
      }
    });
  }

  for (const prompt of [32, 37]) {
    it(`fork after ${prompt} tokens: each side sees only its own tokens`, () => {
      const random = new Random(61_000 + prompt);
      const parent = gpuCache({ pageTokens: 16 });
      const mirror = new LayerMirror(heads, 'f16');
      const tokens = randomTokens(random, heads, prompt);
      parent.prefill(0, tokens.q, tokens.k, tokens.v);
      mirror.append(tokens.k, tokens.v);
      const child = parent.fork();
      open.push(child);
      expect(child.device).toBe('cuda');
      expect(parent.stats().bytes.shared).toBeGreaterThan(0);
      const parentMirror = mirror, childMirror = mirror.fork();
      for (let t = 0; t < 20; t++) {
        const a = randomTokens(random, heads, 1), b = randomTokens(random, heads, 1);
        parentMirror.append(a.k, a.v);
        childMirror.append(b.k, b.v);
        expect(relativeL2(parent.step(0, a.q, a.k, a.v), parentMirror.attend(a.q))).toBeLessThanOrEqual(TOLERANCE);
        expect(relativeL2(child.step(0, b.q, b.k, b.v), childMirror.attend(b.q))).toBeLessThanOrEqual(TOLERANCE);
      }
    });
  }

  it('a cache saved on the GPU loads on the CPU with the same outputs', () => {
    const random = new Random(62_000);
    const cache = gpuCache({ pageTokens: 16 });
    const tokens = randomTokens(random, heads, 50);
    cache.prefill(0, tokens.q, tokens.k, tokens.v);
    const onCpu = KVCache.load(cache.save(), { device: 'cpu' });
    open.push(onCpu);
    const query = randomTokens(random, heads, 2).q;
    expect(relativeL2(onCpu.attend(0, query), cache.attend(0, query))).toBeLessThanOrEqual(TOLERANCE);
  });
});

// The KIVI kernels (native/cuda/kivi_attention.cu vs native/cpu/kivi_kernels.inl) read the same
// codes: the same cache contents on both devices must attend alike. (kivi-cache.test.ts checks
// the GPU cache against the float64 reference under KVSLIM_TEST_DEVICE=cuda.)
describe.runIf(onGpu)('CUDA: KIVI store against the CPU', () => {
  const cases = [
    { heads: { qHeads: 32, kvHeads: 8, headDim: 128 }, bits: 2, group: 32, residual: 128, T: 3000, n: 1 },
    { heads: { qHeads: 8, kvHeads: 2, headDim: 64 }, bits: 4, group: 16, residual: 32, T: 777, n: 5 },
    { heads: { qHeads: 4, kvHeads: 4, headDim: 256 }, bits: 8, group: 64, residual: 64, T: 1000, n: 40 },
  ] as const;
  for (const [index, c] of cases.entries()) {
    it(`bits ${c.bits}, group ${c.group}, ${c.heads.qHeads}/${c.heads.kvHeads}/${c.heads.headDim}, T ${c.T}, n ${c.n}`, () => {
      const random = new Random(63_000 + index);
      const make = (device: 'cpu' | 'cuda') => {
        const cache = new KVCache({ layers: 1, ...c.heads, device, policy: { store: { kind: 'kivi', bits: c.bits, group: c.group, residual: c.residual } } });
        open.push(cache);
        return cache;
      };
      const gpu = make('cuda'), cpu = make('cpu');
      for (let done = 0; done < c.T;) {
        const size = Math.min(c.T - done, 1 + random.integer(300));
        const tokens = randomTokens(random, c.heads, size);
        gpu.append(0, tokens.k, tokens.v);
        cpu.append(0, tokens.k, tokens.v);
        done += size;
      }
      expect(Buffer.compare(gpu.save(), cpu.save()), 'the same codes on both devices').toBe(0);
      const query = randomTokens(random, c.heads, c.n);
      expect(relativeL2(gpu.attend(0, query.q), cpu.attend(0, query.q))).toBeLessThanOrEqual(TOLERANCE);
      const step = randomTokens(random, c.heads, 1);
      expect(relativeL2(gpu.step(0, step.q, step.k, step.v), cpu.step(0, step.q, step.k, step.v))).toBeLessThanOrEqual(TOLERANCE);
    });
  }
});

// Selection policies on a GPU cache: scores on the GPU (native/cuda/attention_scores.cu), the
// window kept by advancing pages (firstRow), kept and window parts merged by log-sum-exp.
describe.runIf(onGpu)('CUDA: selection policies choose what the CPU chooses', () => {
  const heads: Heads = { qHeads: 8, kvHeads: 2, headDim: 64 };
  const selects = [
    { kind: 'streaming', sink: 4, window: 40 },
    { kind: 'snapkv', budget: 48, window: 8, kernel: 5 },
    { kind: 'h2o', budget: 40, recent: 16 },
    { kind: 'duo', heads: [true, false, false, true], sink: 4, window: 24 },
  ] as const;
  for (const [index, select] of selects.entries()) {
    it(select.kind, () => {
      const random = new Random(64_000 + index);
      const make = (device: 'cpu' | 'cuda') => {
        const cache = new KVCache({ layers: 2, ...heads, device, pageTokens: 8, policy: { select: select as never } });
        open.push(cache);
        return cache;
      };
      const gpu = make('cuda'), cpu = make('cpu');
      for (let layer = 0; layer < 2; layer++) {
        const prompt = randomTokens(random, heads, 150);
        expect(relativeL2(gpu.prefill(layer, prompt.q, prompt.k, prompt.v), cpu.prefill(layer, prompt.q, prompt.k, prompt.v))).toBeLessThanOrEqual(TOLERANCE);
        for (let t = 0; t < 30; t++) {
          const token = randomTokens(random, heads, 1);
          const out = gpu.step(layer, token.q, token.k, token.v);
          expect(relativeL2(out, cpu.step(layer, token.q, token.k, token.v)), `layer ${layer} step ${t}`).toBeLessThanOrEqual(TOLERANCE);
        }
        for (let kvHead = 0; kvHead < heads.kvHeads; kvHead++) {
          expect(Array.from(gpu.positions(layer, kvHead))).toEqual(Array.from(cpu.positions(layer, kvHead)));
        }
      }
    });
  }
});

describe.runIf(onGpu)('CUDA: loading policies load what the CPU loads', () => {
  // The flat scan (attentionScores) and the static + gathered attention (row-pointer views) run on
  // the GPU; quest bounds and the graph search run on the host for both.
  const heads: Heads = { qHeads: 8, kvHeads: 2, headDim: 64 };
  const selects = [
    { kind: 'retrieval', index: 'flat', topK: 12, sink: 4, window: 16 },
    { kind: 'retrieval', index: 'graph', topK: 12, sink: 4, window: 16 },
    { kind: 'quest', pages: 3, pageSize: 8, sink: 4, window: 16 },
  ] as const;
  for (const [index, select] of selects.entries()) {
    it(`${select.kind} ${'index' in select ? select.index : ''}`, () => {
      const random = new Random(65_000 + index);
      const make = (device: 'cpu' | 'cuda') => {
        const cache = new KVCache({ layers: 1, ...heads, device, pageTokens: 8, policy: { select: select as never, store: { kind: 'f32' } } });
        open.push(cache);
        return cache;
      };
      const gpu = make('cuda'), cpu = make('cpu');
      const prompt = randomTokens(random, heads, 300);
      expect(relativeL2(gpu.prefill(0, prompt.q, prompt.k, prompt.v), cpu.prefill(0, prompt.q, prompt.k, prompt.v))).toBeLessThanOrEqual(TOLERANCE);
      for (let t = 0; t < 20; t++) {
        const token = randomTokens(random, heads, 1);
        const out = gpu.step(0, token.q, token.k, token.v);
        expect(relativeL2(out, cpu.step(0, token.q, token.k, token.v)), `step ${t}`).toBeLessThanOrEqual(TOLERANCE);
        for (let kvHead = 0; kvHead < heads.kvHeads; kvHead++) {
          expect(Array.from(gpu.loadedPositions(0, kvHead))).toEqual(Array.from(cpu.loadedPositions(0, kvHead)));
        }
      }
    });
  }
});

describe('device selection without KVSLIM_TEST_DEVICE=cuda', () => {
  it("device 'auto' picks CUDA only when a GPU answers", () => {
    const cache = new KVCache({ layers: 1, qHeads: 2, kvHeads: 1, headDim: 16 });
    open.push(cache);
    expect(cache.device).toBe(backends().cuda?.available ? 'cuda' : 'cpu');
    const explicit = new KVCache({ layers: 1, qHeads: 2, kvHeads: 1, headDim: 16, device: 'cpu' });
    open.push(explicit);
    expect(explicit.device).toBe('cpu');
  });
});
