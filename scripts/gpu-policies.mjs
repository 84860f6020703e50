// On a GPU machine (scripts/gpu-run.sh runs it): what selection adds to a whole-prompt prefill on
// the GPU (#4's target: at most 5% at 32K), and one decode step after it. Per policy: the median of
// interleaved prefills of the whole prompt into a fresh cache (32q/8kv/128, random keys, values and
// queries: timing only; gpu.test.ts checks the choices), its overhead over the full cache's, the
// selection's own time (stats().timeMs.compress) and one attend of the compressed cache.
// Usage: node scripts/gpu-policies.mjs [tokens...]   (DEVICE=cpu: the same on the CPU backend;
// RUNS: interleaved prefills per policy, default 3)
import { KVCache } from '../dist/lib/index.js';
import { randomFloats as random } from './random-floats.mjs';

const Q_HEADS = 32, KV_HEADS = 8, DIM = 128, RUNS = Number(process.env.RUNS ?? 3), STEPS = 20;
const device = process.env.DEVICE ?? 'cuda';
const sizes = process.argv.slice(2).map(Number);

const policies = (tokens) => [
  ['full', { kind: 'full' }],
  ['snapkv 1/8', { kind: 'snapkv', budget: tokens / 8 }],
  ['pyramidkv 1/8', { kind: 'pyramidkv', budget: tokens / 8 }],
  ['h2o 1/8', { kind: 'h2o', budget: tokens / 8, recent: tokens / 32 }],
];

function median(samples) {
  return [...samples].sort((a, b) => a - b)[samples.length >> 1];
}

for (const tokens of sizes.length > 0 ? sizes : [32768]) {
  const keys = random(tokens * KV_HEADS * DIM, 1), values = random(tokens * KV_HEADS * DIM, 2);
  const queries = random(tokens * Q_HEADS * DIM, 3), query = random(Q_HEADS * DIM, 4);
  const out = new Float32Array(Q_HEADS * DIM);
  const rows = policies(tokens).map(([name, select]) => ({ name, select, prefill: [], compress: [], attend: NaN }));
  for (let run = -1; run < RUNS; run++) {
    for (const row of rows) {
      const cache = new KVCache({ layers: 1, qHeads: Q_HEADS, kvHeads: KV_HEADS, headDim: DIM, device, policy: { select: row.select, store: { kind: 'f16' } } });
      try {
        const start = process.hrtime.bigint();
        cache.prefill(0, queries, keys, values);
        const ms = Number(process.hrtime.bigint() - start) / 1e6;
        if (run < 0) continue; // warm-up: module load, workspace growth
        row.prefill.push(ms);
        row.compress.push(cache.stats().timeMs.compress);
        if (run === RUNS - 1) {
          const steps = [];
          for (let i = 0; i < STEPS; i++) {
            const begin = process.hrtime.bigint();
            cache.attend(0, query, { out });
            steps.push(Number(process.hrtime.bigint() - begin) / 1e6);
          }
          row.attend = median(steps);
        }
      } catch (error) {
        row.error = error instanceof Error ? error.message : String(error);
      } finally {
        cache.dispose();
      }
    }
  }
  const fullMs = median(rows[0].prefill);
  for (const row of rows) {
    if (row.error) { console.log(`${String(tokens).padStart(6)} ${row.name.padEnd(14)} FAILED: ${row.error}`); continue; }
    const ms = median(row.prefill);
    console.log(`${String(tokens).padStart(6)} ${row.name.padEnd(14)} prefill ${ms.toFixed(2).padStart(9)} ms ` +
      `(${row.prefill.map((x) => x.toFixed(1)).join(' ')})  +${((ms / fullMs - 1) * 100).toFixed(1).padStart(5)}%  ` +
      `select ${median(row.compress).toFixed(2).padStart(7)} ms  attend ${row.attend.toFixed(3)} ms`);
  }
}
