// The CUDA backend (native/cuda/) against the CPU path and the float64 reference, on the shapes of
// attention.test.ts, and a KVCache living on the GPU. Runs on a GPU host with `npm run test:gpu`
// (KVSLIM_TEST_DEVICE=cuda); elsewhere only the CPU-side checks at the bottom run.
import { describe, expect, it } from 'vitest';

import { KVCache, backends } from '../lib/index.js';
import { ATTENTION_CASES, compareAttention, label } from './helpers/attention-cases.js';
import { Random, relativeL2, rows } from './helpers/random.js';
import { type Heads, LayerMirror, randomTokens, sliceTokens } from './helpers/tokens.js';
import { disposedAfterEach } from './helpers/lifetime.js';
import { roundTo } from './reference/half.js';
import { groupRows, pageBound } from './reference/loading.js';

// GPU kernels also compute in f32 (in a different order, possibly with fast exp2): the same bound
// as the CPU against the reference, and the same between the two devices.
const TOLERANCE = 2e-5;
const onGpu = process.env.KVSLIM_TEST_DEVICE === 'cuda';

const open = disposedAfterEach<KVCache>();

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

// H2O over the KIVI store on a GPU cache: the KIVI kernel masks the flagged tokens and captures
// each row's scores, and native/cuda/captured_mass.cu turns them into the mass. Step by step the
// same tokens are evicted and compacted as on the CPU (random data leaves no near ties), through
// 8-row blocks, steps of several tokens and a fork. (h2o-kivi.test.ts runs on the GPU too, against
// the float64 references, with the mass in query chunks.)
describe.runIf(onGpu)('CUDA: H2O over the KIVI store evicts what the CPU evicts', () => {
  const cases = [
    { heads: { qHeads: 32, kvHeads: 8, headDim: 128 }, bits: 2, group: 32, residual: 64, budget: 96, recent: 24, prompt: 300, steps: 90, n: 1 },
    { heads: { qHeads: 16, kvHeads: 2, headDim: 64 }, bits: 4, group: 16, residual: 32, budget: 60, recent: 8, prompt: 90, steps: 50, n: 3 },
    { heads: { qHeads: 4, kvHeads: 4, headDim: 96 }, bits: 8, group: 32, residual: 32, budget: 200, recent: 40, prompt: 500, steps: 40, n: 1 },
  ] as const;
  for (const [index, c] of cases.entries()) {
    it(`bits ${c.bits}, ${c.heads.qHeads}/${c.heads.kvHeads}/${c.heads.headDim}, budget ${c.budget}, steps of ${c.n}`, () => {
      const random = new Random(65_000 + index);
      const layers = 2;
      const make = (device: 'cpu' | 'cuda') => {
        const cache = new KVCache({
          layers, ...c.heads, device, pageTokens: 16,
          policy: { select: { kind: 'h2o', budget: c.budget, recent: c.recent }, store: { kind: 'kivi', bits: c.bits, group: c.group, residual: c.residual } },
        });
        open.push(cache);
        return cache;
      };
      let gpu = make('cuda'), cpu = make('cpu');
      const same = (what: string) => {
        for (let layer = 0; layer < layers; layer++) {
          for (let kvHead = 0; kvHead < c.heads.kvHeads; kvHead++) {
            expect(Array.from(gpu.positions(layer, kvHead)), `${what} layer ${layer} kv head ${kvHead}`).toEqual(Array.from(cpu.positions(layer, kvHead)));
          }
        }
        expect(gpu.stats().bytes.kv, `${what} bytes`).toBe(cpu.stats().bytes.kv);
      };
      for (let layer = 0; layer < layers; layer++) {
        const prompt = randomTokens(random, c.heads, c.prompt);
        expect(relativeL2(gpu.prefill(layer, prompt.q, prompt.k, prompt.v), cpu.prefill(layer, prompt.q, prompt.k, prompt.v))).toBeLessThanOrEqual(TOLERANCE);
      }
      same('prefill');
      let compactions = 0;
      for (let t = 0; t < c.steps; t++) {
        const bytes = gpu.stats().bytes.kv;
        if (t === c.steps >> 1) {
          // A fork on each device goes on from the shared quantized pages.
          gpu = gpu.fork();
          cpu = cpu.fork();
          open.push(gpu, cpu);
        }
        for (let layer = 0; layer < layers; layer++) {
          const token = randomTokens(random, c.heads, c.n);
          const out = gpu.step(layer, token.q, token.k, token.v);
          expect(relativeL2(out, cpu.step(layer, token.q, token.k, token.v)), `layer ${layer} step ${t}`).toBeLessThanOrEqual(TOLERANCE);
        }
        same(`step ${t}`);
        if (gpu.stats().bytes.kv < bytes) compactions++;  // flagged rows left the store
      }
      expect(compactions, 'the layers were compacted').toBeGreaterThan(0);
      const query = randomTokens(random, c.heads, 2);
      expect(relativeL2(gpu.attend(1, query.q), cpu.attend(1, query.q)), 'attend').toBeLessThanOrEqual(TOLERANCE);
    });
  }
});

// Selection policies on a GPU cache: attention mass on the GPU (native/cuda/attention_mass.cu), the
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

// Long prompts through the attention mass op on both devices (native/cuda/attention_mass.cu, with
// row blocks, pooling and the group mean on the GPU, vs native/cpu/attention_mass.cc). Both
// compute fp32 probabilities and double column sums, with different exp2 approximations and
// summation orders, so they agree to ~1e-6 relative: the kept sets must be equal, except that
// SnapKV/PyramidKV may swap prefix tokens whose float64 votes (reference/select.ts rules) lie
// within 1e-6 relative of the selection threshold (a near tie). H2O's evictions depend on the
// whole history, so it has no such slack: random normal data leaves no near ties at these sizes
// (select-long.test.ts checks the CPU against the float64 reference exactly).
describe.runIf(onGpu)('CUDA: attention mass selection on long prompts keeps what the CPU keeps', () => {
  const NEAR_TIE = 1e-6;
  const cases = [
    { name: 'snapkv, f16, 32q/8kv/128, prompt 3000', heads: { qHeads: 32, kvHeads: 8, headDim: 128 }, layers: 1, store: 'f16',
      pageTokens: 64, select: { kind: 'snapkv', budget: 256, window: 32 }, calls: [3000, 1, 1] },
    { name: 'snapkv avg k5, f32, 8q/2kv/72 (no 16-byte loads), pages of 16, prompt 2500', heads: { qHeads: 8, kvHeads: 2, headDim: 72 },
      layers: 1, store: 'f32', pageTokens: 16, select: { kind: 'snapkv', budget: 200, window: 16, kernel: 5, pooling: 'avg' }, calls: [2500, 1] },
    { name: 'pyramidkv, bf16, 16q/4kv/64, three layers, prompt 2000', heads: { qHeads: 16, kvHeads: 4, headDim: 64 }, layers: 3,
      store: 'bf16', pageTokens: 32, select: { kind: 'pyramidkv', budget: 256, window: 32, beta: 4 }, calls: [2000, 1] },
    { name: 'h2o, f16, 32q/8kv/128, prompt 3000, then 500, then steps', heads: { qHeads: 32, kvHeads: 8, headDim: 128 }, layers: 1,
      store: 'f16', pageTokens: 64, select: { kind: 'h2o', budget: 256, recent: 64 }, calls: [3000, 500, ...Array<number>(20).fill(1)] },
    { name: 'h2o, f32, 8q/2kv/72, pages of 16, prompt 1500, then steps', heads: { qHeads: 8, kvHeads: 2, headDim: 72 }, layers: 1,
      store: 'f32', pageTokens: 16, select: { kind: 'h2o', budget: 128, recent: 32 }, calls: [1500, ...Array<number>(20).fill(1)] },
    { name: 'h2o, bf16, 12q/6kv/100 (no 16-byte loads), pages of 32, prompt 1200, then 300, then steps', heads: { qHeads: 12, kvHeads: 6, headDim: 100 },
      layers: 1, store: 'bf16', pageTokens: 32, select: { kind: 'h2o', budget: 160, recent: 48 }, calls: [1200, 300, ...Array<number>(10).fill(1)] },
  ] as const;

  /** SnapKV's float64 votes of one kv head over the prefix: window softmax sums, pooled, averaged over the group. */
  function snapVotes(heads: Heads, store: 'f16' | 'f32' | 'bf16', q: Float32Array, k: Float32Array, h: number,
    select: { window: number; kernel?: number; pooling?: 'max' | 'avg' }): Float64Array {
    const { qHeads, kvHeads, headDim } = heads;
    const L = k.length / (kvHeads * headDim), w = Math.min(select.window, L), prefix = L - w, group = qHeads / kvHeads;
    const kernel = select.kernel ?? 7, half = (kernel - 1) / 2, pooling = select.pooling ?? 'max';
    const keys = roundTo(k, store);
    const score = new Float64Array(prefix);
    for (let g = 0; g < group; g++) {
      const votes = new Float64Array(prefix);
      for (let i = L - w; i < L; i++) {
        const base = (i * qHeads + h * group + g) * headDim;
        const logits = new Float64Array(i + 1);
        let max = -Infinity, sum = 0;
        for (let j = 0; j <= i; j++) {
          let dot = 0;
          for (let d = 0; d < headDim; d++) dot += q[base + d] * keys[(j * kvHeads + h) * headDim + d];
          logits[j] = dot / Math.sqrt(headDim);
          max = Math.max(max, logits[j]);
        }
        for (let j = 0; j <= i; j++) sum += (logits[j] = Math.exp(logits[j] - max));
        for (let j = 0; j < prefix; j++) votes[j] += logits[j] / sum;
      }
      for (let j = 0; j < prefix; j++) {
        let value = pooling === 'max' ? -Infinity : 0;
        for (let t = Math.max(0, j - half); t <= Math.min(prefix - 1, j + half); t++) value = pooling === 'max' ? Math.max(value, votes[t]) : value + votes[t];
        score[j] += (pooling === 'max' ? value : value / kernel) / group;
      }
    }
    return score;
  }

  for (const [index, c] of cases.entries()) {
    it(c.name, () => {
      const random = new Random(66_000 + index);
      const make = (device: 'cpu' | 'cuda') => {
        const cache = new KVCache({
          layers: c.layers, ...c.heads, device, pageTokens: c.pageTokens,
          policy: { select: c.select as never, store: { kind: c.store } },
        });
        open.push(cache);
        return cache;
      };
      const gpu = make('cuda'), cpu = make('cpu');
      for (const [call, n] of c.calls.entries()) {
        for (let layer = 0; layer < c.layers; layer++) {
          const tokens = randomTokens(random, c.heads, n);
          const kind = n === 1 ? 'step' : 'prefill';
          const gpuOut = gpu[kind](layer, tokens.q, tokens.k, tokens.v);
          expect(relativeL2(gpuOut, cpu[kind](layer, tokens.q, tokens.k, tokens.v)), `call ${call} layer ${layer}`).toBeLessThanOrEqual(TOLERANCE);
          for (let h = 0; h < c.heads.kvHeads; h++) {
            const gpuKept = Array.from(gpu.positions(layer, h)), cpuKept = Array.from(cpu.positions(layer, h));
            const where = `call ${call} (n ${n}) layer ${layer} kv head ${h}`;
            if (c.select.kind === 'h2o' || call > 0 || gpuKept.join() === cpuKept.join()) {
              expect(gpuKept, where).toEqual(cpuKept);
              continue;
            }
            // SnapKV's one decision: positions may differ only by near ties of the float64 votes.
            expect(gpuKept.length, where).toBe(cpuKept.length);
            const select = c.select as { window: number; kernel?: number; pooling?: 'max' | 'avg' };
            const votes = snapVotes(c.heads, c.store, tokens.q, tokens.k, h, select);
            const chosen = cpuKept.filter((p) => p < votes.length);
            const threshold = Math.min(...chosen.map((p) => votes[p]));
            const gpuSet = new Set(gpuKept), cpuSet = new Set(cpuKept);
            for (const p of [...gpuKept.filter((x) => !cpuSet.has(x)), ...cpuKept.filter((x) => !gpuSet.has(x))]) {
              expect(p, `${where}: only the prefix may differ`).toBeLessThan(votes.length);
              expect(Math.abs(votes[p] - threshold), `${where}: position ${p} is no near tie`).toBeLessThanOrEqual(NEAR_TIE * threshold);
            }
          }
        }
      }
    });
  }
});

describe.runIf(onGpu)('CUDA: loading policies load what the CPU loads', () => {
  // The flat scan (attentionScores) and the static + gathered attention (row-pointer views) run on
  // the GPU; the graph search runs on the host for both. (Quest: the next describe.)
  const heads: Heads = { qHeads: 8, kvHeads: 2, headDim: 64 };
  const selects = [
    { kind: 'retrieval', index: 'flat', topK: 12, sink: 4, window: 16 },
    { kind: 'retrieval', index: 'graph', topK: 12, sink: 4, window: 16 },
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

// ActQKV's block representatives live in device memory on a GPU cache; blockScores and topBlocks
// (native/cuda/block_scores.cu) score them with the CPU's fixed-order double dot, so both devices
// rank the blocks identically. The entropies differ in the last bits (summation order, exp, log);
// the block count derived from them could then differ by one, which on these random inputs it
// does not. A fork made mid-decode copies a shared representative buffer on the device before it writes.
describe.runIf(onGpu)('CUDA: actqkv scores its blocks on the GPU and loads what the CPU loads', () => {
  const cases = [
    { name: 'GQA 8/2, d64, 2 layers', heads: { qHeads: 8, kvHeads: 2, headDim: 64 }, layers: 2, prompt: 600, steps: 40 },
    { name: 'GQA 12/4, d100 (a tail of 4), 3 layers', heads: { qHeads: 12, kvHeads: 4, headDim: 100 }, layers: 3, prompt: 300, steps: 40 },
  ];
  for (const [index, c] of cases.entries()) {
    it(c.name, () => {
      const random = new Random(66_000 + index);
      const select = { kind: 'actqkv', sink: 8, window: 32, blockSize: 4, blocks: 6, reprTopK: 2, queryWindow: 16 } as const;
      const make = (device: 'cpu' | 'cuda') => {
        const cache = new KVCache({ layers: c.layers, ...c.heads, device, pageTokens: 16, policy: { select, store: { kind: 'f16' } } });
        open.push(cache);
        return cache;
      };
      let gpu = make('cuda'), cpu = make('cpu');
      for (let layer = 0; layer < c.layers; layer++) {
        const prompt = randomTokens(random, c.heads, c.prompt);
        const a = gpu.prefill(layer, prompt.q, prompt.k, prompt.v), b = cpu.prefill(layer, prompt.q, prompt.k, prompt.v);
        expect(relativeL2(a, b), `prefill layer ${layer}`).toBeLessThanOrEqual(TOLERANCE);
      }
      for (let t = 0; t < c.steps; t++) {
        if (t === c.steps / 2) {
          // Continue on forks: their first steps copy the shared representatives.
          gpu = gpu.fork();
          cpu = cpu.fork();
          open.push(gpu, cpu);
        }
        for (let layer = 0; layer < c.layers; layer++) {
          const token = randomTokens(random, c.heads, 1);
          const out = gpu.step(layer, token.q, token.k, token.v);
          expect(relativeL2(out, cpu.step(layer, token.q, token.k, token.v)), `step ${t} layer ${layer}`).toBeLessThanOrEqual(TOLERANCE);
          for (let kvHead = 0; kvHead < c.heads.kvHeads; kvHead++) {
            expect(Array.from(gpu.loadedPositions(layer, kvHead)), `step ${t} layer ${layer} head ${kvHead}`)
              .toEqual(Array.from(cpu.loadedPositions(layer, kvHead)));
          }
        }
      }
      expect(gpu.stats().bytes.index).toBe(cpu.stats().bytes.index);
    });
  }
});

// Quest's boxes and bounds on the GPU (native/cuda/page_bounds.cu) against the CPU's
// (native/cpu/page_bounds.cc). The boxes are min / max of the same stored keys (the same bits);
// the bounds sum the channels in another order, so the loaded pages may differ only where float64
// bounds are a near tie with the last page chosen (then the outputs differ too and are not compared).
// Long prompts box hundreds of pages in one call, appends grow the boxes' allocation, and a fork
// copies them on the device before its first write.
describe.runIf(onGpu)('CUDA: quest boxes and bounds on the GPU load what the CPU loads', () => {
  const NEAR_TIE = 1e-5;
  const cases = [
    { name: 'f32, 8q/2kv/64, pages of 8, prompt 300', heads: { qHeads: 8, kvHeads: 2, headDim: 64 }, store: 'f32', pageTokens: 8,
      select: { kind: 'quest', pages: 3, pageSize: 8, sink: 4, window: 16 }, prompt: 300, append: 50 },
    { name: 'f16, 32q/8kv/128, pages of 16, prompt 5000', heads: { qHeads: 32, kvHeads: 8, headDim: 128 }, store: 'f16', pageTokens: 64,
      select: { kind: 'quest', pages: 16, pageSize: 16, sink: 4, window: 64 }, prompt: 5000, append: 600 },
    { name: 'bf16, 8q/2kv/72 (no 16-byte rows), pages of 5 across store pages of 16, prompt 1500', heads: { qHeads: 8, kvHeads: 2, headDim: 72 },
      store: 'bf16', pageTokens: 16, select: { kind: 'quest', pages: 6, pageSize: 5, sink: 2, window: 16 }, prompt: 1500, append: 300 },
    { name: 'f16, 6q/3kv/40, pages of 1, prompt 600', heads: { qHeads: 6, kvHeads: 3, headDim: 40 }, store: 'f16', pageTokens: 8,
      select: { kind: 'quest', pages: 40, pageSize: 1, sink: 1, window: 8 }, prompt: 600, append: 100 },
  ] as const;

  for (const [index, c] of cases.entries()) {
    it(c.name, () => {
      const random = new Random(67_000 + index);
      const { qHeads, kvHeads, headDim } = c.heads;
      const { sink, window, pageSize } = c.select;
      const make = (device: 'cpu' | 'cuda') => {
        const cache = new KVCache({ layers: 1, ...c.heads, device, pageTokens: c.pageTokens, policy: { select: c.select, store: { kind: c.store } } });
        open.push(cache);
        return cache;
      };
      /** A GPU cache, its CPU twin, and the keys both store ([kvHead][token], rounded to the store dtype). */
      const pair = (gpu: KVCache, cpu: KVCache, keys: number[][][]) => ({ gpu, cpu, keys });
      const keep = (keys: number[][][], k: Float32Array, n: number) => {
        const stored = roundTo(k, c.store);
        for (let t = 0; t < n; t++) {
          for (let h = 0; h < kvHeads; h++) keys[h].push(Array.from(stored.subarray((t * kvHeads + h) * headDim, (t * kvHeads + h + 1) * headDim)));
        }
      };
      const pagesOf = (loaded: number[]) =>
        [...new Set(loaded.slice(sink, loaded.length - window).map((t) => Math.floor((t - sink) / pageSize)))];
      const step = (p: ReturnType<typeof pair>, where: string) => {
        const token = randomTokens(random, c.heads, 1);
        keep(p.keys, token.k, 1);
        const gpuOut = p.gpu.step(0, token.q, token.k, token.v);
        const cpuOut = p.cpu.step(0, token.q, token.k, token.v);
        let same = true;
        for (let h = 0; h < kvHeads; h++) {
          const gpuPages = pagesOf(Array.from(p.gpu.loadedPositions(0, h)));
          const cpuPages = pagesOf(Array.from(p.cpu.loadedPositions(0, h)));
          if (gpuPages.join() === cpuPages.join()) continue;
          same = false;
          expect(gpuPages.length, `${where} kv head ${h}`).toBe(cpuPages.length);
          const T = p.keys[h].length, dynamic = T - sink - window;
          const rowsF64 = groupRows(token.q, 1, qHeads, kvHeads, h, headDim);
          const bound = (page: number) => {
            const members = [];
            for (let t = sink + page * pageSize; t < sink + Math.min(dynamic, (page + 1) * pageSize); t++) members.push(p.keys[h][t]);
            return pageBound(rowsF64, members);
          };
          const threshold = Math.min(...cpuPages.map(bound));
          const gpuSet = new Set(gpuPages), cpuSet = new Set(cpuPages);
          for (const page of [...gpuPages.filter((x) => !cpuSet.has(x)), ...cpuPages.filter((x) => !gpuSet.has(x))]) {
            expect(Math.abs(bound(page) - threshold), `${where} kv head ${h}: page ${page} is no near tie`).toBeLessThanOrEqual(NEAR_TIE * Math.abs(threshold));
          }
        }
        if (same) expect(relativeL2(gpuOut, cpuOut), where).toBeLessThanOrEqual(TOLERANCE);
      };

      const main = pair(make('cuda'), make('cpu'), Array.from({ length: kvHeads }, () => []));
      const prompt = randomTokens(random, c.heads, c.prompt);
      keep(main.keys, prompt.k, c.prompt);
      expect(relativeL2(main.gpu.prefill(0, prompt.q, prompt.k, prompt.v), main.cpu.prefill(0, prompt.q, prompt.k, prompt.v))).toBeLessThanOrEqual(TOLERANCE);
      for (let t = 0; t < 10; t++) step(main, `step ${t}`);
      expect(main.gpu.stats().bytes.index).toBe(main.cpu.stats().bytes.index);
      // Many tokens leave the window at the next call: the boxes' allocation grows.
      const more = randomTokens(random, c.heads, c.append);
      keep(main.keys, more.k, c.append);
      main.gpu.append(0, more.k, more.v);
      main.cpu.append(0, more.k, more.v);
      for (let t = 0; t < 10; t++) step(main, `after append, step ${t}`);
      // Fork both: the fork's first decode call copies the boxes on the device; the sides diverge.
      const forkGpu = main.gpu.fork(), forkCpu = main.cpu.fork();
      open.push(forkGpu, forkCpu);
      const fork = pair(forkGpu, forkCpu, main.keys.map((head) => head.slice()));
      for (let t = 0; t < window + 10; t++) {
        step(fork, `fork step ${t}`);
        step(main, `parent step ${t}`);
      }
      expect(fork.gpu.stats().bytes.index).toBe(fork.cpu.stats().bytes.index);
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
