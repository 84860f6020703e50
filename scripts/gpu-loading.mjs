// On a GPU machine (scripts/gpu-run.sh runs it): one decode call (attend of one query) of the
// loading policies against the full f16 cache, every cache on the GPU, at 64K and 256K tokens
// (32q/8kv/128, random keys and values: timing only; gpu.test.ts checks what they load). The
// policies' per-call host work (ActQKV's probe, the graph search) and their backend ops (Quest's
// bounds, the flat scan, ActQKV's block scores and top blocks) are inside the time.
// Usage: node scripts/gpu-loading.mjs [tokens...]   (DEVICE=cpu: the same on the CPU backend;
// ONLY=full,actqkv: only the policies whose names start with these)
import { KVCache } from '../dist/lib/index.js';
import { randomFloats as random } from './random-floats.mjs';

const Q_HEADS = 32, KV_HEADS = 8, DIM = 128, CHUNK = 8192, PROMPT = 256, RUNS = 30;
const POLICIES = [
  ['full', { kind: 'full' }],
  ['quest 128x16', { kind: 'quest', sink: 128, window: 512, pageSize: 16, pages: 128 }],
  ['flat top-100', { kind: 'retrieval', index: 'flat', topK: 100, sink: 128, window: 512 }],
  ['actqkv 46x32', { kind: 'actqkv', sink: 128, window: 512 }],
];

const keys = random(CHUNK * KV_HEADS * DIM, 1), values = random(CHUNK * KV_HEADS * DIM, 2);
const prompt = random(PROMPT * Q_HEADS * DIM, 3);
const query = random(Q_HEADS * DIM, 4), out = new Float32Array(Q_HEADS * DIM);
const sizes = process.argv.slice(2).map(Number);

for (const tokens of sizes.length > 0 ? sizes : [65536, 262144]) {
  let fullMs = NaN;
  const only = process.env.ONLY?.split(',') ?? null;
  for (const [name, select] of POLICIES.filter(([policy]) => only === null || only.some((prefix) => policy.startsWith(prefix)))) {
    const cache = new KVCache({ layers: 1, qHeads: Q_HEADS, kvHeads: KV_HEADS, headDim: DIM, device: process.env.DEVICE ?? 'cuda', policy: { select, store: { kind: 'f16' } } });
    try {
      for (let t = 0; t < tokens - PROMPT; t += CHUNK) {
        const n = Math.min(CHUNK, tokens - PROMPT - t);
        cache.append(0, keys.subarray(0, n * KV_HEADS * DIM), values.subarray(0, n * KV_HEADS * DIM));
      }
      // ActQKV's statistics and probe start from prefill queries.
      cache.prefill(0, prompt, keys.subarray(0, PROMPT * KV_HEADS * DIM), values.subarray(0, PROMPT * KV_HEADS * DIM));
      for (let i = 0; i < 5; i++) cache.attend(0, query, { out });
      const samples = [];
      for (let i = 0; i < RUNS; i++) {
        const start = process.hrtime.bigint();
        cache.attend(0, query, { out });
        samples.push(Number(process.hrtime.bigint() - start) / 1e6);
      }
      samples.sort((a, b) => a - b);
      const ms = samples[samples.length >> 1];
      if (name === 'full') fullMs = ms;
      const stats = cache.stats();
      console.log(`${String(tokens).padStart(7)} ${name.padEnd(14)} ${ms.toFixed(3).padStart(8)} ms  ${(fullMs / ms).toFixed(2).padStart(6)}x  ` +
        `loaded ${stats.tokens.loaded}  retrieve ${stats.timeMs.retrieve.toFixed(1)} ms in total`);
    } catch (error) {
      console.log(`${String(tokens).padStart(7)} ${name.padEnd(14)} FAILED: ${error instanceof Error ? error.message : String(error)}`);
    } finally {
      cache.dispose();
    }
  }
}
