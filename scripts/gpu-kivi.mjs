// On a GPU machine (scripts/gpu-run.sh runs it): one decode call of KIVI caches against the f16
// cache, every cache on the GPU (32q/8kv/128, random keys and values: timing only; gpu.test.ts
// checks the outputs), and one H2O step over KIVI-2 (its mass from the KIVI kernel's captured
// scores) against H2O over f16 at the same budget. Medians of 30 calls after 5 warm-ups, the host
// call included.
// Usage: node scripts/gpu-kivi.mjs [tokens...]   (DEVICE=cpu: the same on the CPU backend)
import { KVCache } from '../dist/lib/index.js';
import { randomFloats as random } from './random-floats.mjs';

const Q_HEADS = 32, KV_HEADS = 8, DIM = 128, CHUNK = 8192, RUNS = 30, BUDGET = 4096;
const device = process.env.DEVICE ?? 'cuda';

function median(run) {
  for (let i = 0; i < 5; i++) run(i);
  const samples = [];
  for (let i = 0; i < RUNS; i++) {
    const start = process.hrtime.bigint();
    run(i);
    samples.push(Number(process.hrtime.bigint() - start) / 1e6);
  }
  return samples.sort((a, b) => a - b)[samples.length >> 1];
}

const keys = random(CHUNK * KV_HEADS * DIM, 1), values = random(CHUNK * KV_HEADS * DIM, 2);
const queries = random(64 * Q_HEADS * DIM, 3), out = new Float32Array(Q_HEADS * DIM);
const row = (i) => queries.subarray((i % 64) * Q_HEADS * DIM, ((i % 64) + 1) * Q_HEADS * DIM);
const sizes = process.argv.slice(2).map(Number);

function filled(store, tokens) {
  const cache = new KVCache({ layers: 1, qHeads: Q_HEADS, kvHeads: KV_HEADS, headDim: DIM, device, policy: { store } });
  for (let t = 0; t < tokens; t += CHUNK) {
    const n = Math.min(CHUNK, tokens - t);
    cache.append(0, keys.subarray(0, n * KV_HEADS * DIM), values.subarray(0, n * KV_HEADS * DIM));
  }
  return cache;
}

for (const tokens of sizes.length > 0 ? sizes : [65536, 1 << 20]) {
  let f16 = NaN;
  for (const [name, store] of [['f16', { kind: 'f16' }], ['kivi-2', { kind: 'kivi', bits: 2 }], ['kivi-4', { kind: 'kivi', bits: 4 }]]) {
    const cache = filled(store, tokens);
    try {
      const ms = median((i) => cache.attend(0, row(i), { out }));
      if (name === 'f16') f16 = ms;
      console.log(`${String(tokens).padStart(8)} attend ${name.padEnd(8)} ${ms.toFixed(3).padStart(8)} ms  ${(f16 / ms).toFixed(2).padStart(6)}x f16`);
    } catch (error) {
      console.log(`${String(tokens).padStart(8)} attend ${name.padEnd(8)} FAILED: ${error instanceof Error ? error.message : String(error)}`);
    } finally {
      cache.dispose();
    }
  }
}

// H2O steps: a prompt of 2 x BUDGET tokens, then decode steps (each appends a token, attends and
// evicts one per kv head; over KIVI the layer compacts every BUDGET / 16 steps).
for (const [name, store] of [['h2o f16', { kind: 'f16' }], ['h2o kivi-2', { kind: 'kivi', bits: 2 }]]) {
  let cache;
  try {
    cache = new KVCache({ layers: 1, qHeads: Q_HEADS, kvHeads: KV_HEADS, headDim: DIM, device,
      policy: { select: { kind: 'h2o', budget: BUDGET, recent: 256 }, store } });
    const prompt = 2 * BUDGET;
    const q = random(prompt * Q_HEADS * DIM, 5);
    cache.prefill(0, q, keys.subarray(0, prompt * KV_HEADS * DIM), values.subarray(0, prompt * KV_HEADS * DIM));
    const step = (i) => {
      const at = (i % 1024) * KV_HEADS * DIM;
      cache.step(0, row(i), keys.subarray(at, at + KV_HEADS * DIM), values.subarray(at, at + KV_HEADS * DIM), { out });
    };
    const ms = median(step);
    console.log(`${String(BUDGET).padStart(8)} step   ${name.padEnd(10)} ${ms.toFixed(3).padStart(8)} ms  kept ${cache.positions(0, 0).length}`);
  } catch (error) {
    console.log(`${String(BUDGET).padStart(8)} step   ${name.padEnd(10)} FAILED: ${error instanceof Error ? error.message : String(error)}`);
  } finally {
    cache?.dispose();
  }
}
