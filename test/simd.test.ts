// Every SIMD level (native/cpu/kernels_{scalar,avx2,avx512}.cc) computes the same attention.
// KVSLIM_SIMD is read once when the addon loads, so each level runs in its own child process
// (test/fixtures/simd-child.mjs, over the compiled dist/) on the same seeded inputs; every level
// is compared with the scalar twin and with the float64 reference.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { backends } from '../lib/index.js';
import { ensureCompiled, repositoryRoot } from './helpers/dist.js';
import { Random, relativeL2 } from './helpers/random.js';
import { referenceAttention } from './reference/attention.js';
import { type Dtype, encodeHalf, roundTo } from './reference/half.js';
import { type KiviConfig, KiviMirror } from './reference/kivi.js';
import { type ReferenceSelectSpec, SelectMirror } from './reference/select.js';
import { type ActQKVOptions, ActQKVReference } from './reference/actqkv.js';

// Between levels: only the summation order and exp2 (libm vs polynomial) differ. Observed:
// 1.5e-7 .. 1.5e-6 (the largest for f32 decode at scale 0.5: large scores, where f32 rounding of
// the scaled query shows).
const LEVEL_TOLERANCE = 1e-5;
// Against the reference, as in attention.test.ts.
const REFERENCE_TOLERANCE = 2e-5;

const child = join(repositoryRoot, 'test/fixtures/simd-child.mjs');

interface Case {
  kind: 'attention' | 'cache' | 'kivi' | 'vectors' | 'actqkv';
  label: string;
  dtype: Dtype;
  n: number;
  T: number;
  qHeads: number;
  kvHeads: number;
  headDim: number;
  causal?: boolean;
  scale?: number;
  store?: Dtype;
  pageTokens?: number;
  prompt?: number;
  kivi?: KiviConfig;
  select?: ReferenceSelectSpec;
  actqkv?: ActQKVOptions;
}

const cases: Case[] = [
  { kind: 'attention', label: 'decode, 2 key splits, d=72', dtype: 'f16', n: 1, T: 1500, qHeads: 8, kvHeads: 2, headDim: 72 },
  { kind: 'attention', label: 'multi-row decode, 12 rows, d=100', dtype: 'bf16', n: 3, T: 200, qHeads: 8, kvHeads: 2, headDim: 100 },
  { kind: 'attention', label: 'decode f32, scale 0.5', dtype: 'f32', n: 1, T: 64, qHeads: 4, kvHeads: 4, headDim: 128, scale: 0.5 },
  { kind: 'attention', label: 'prefill, d=80', dtype: 'f32', n: 70, T: 300, qHeads: 4, kvHeads: 1, headDim: 80 },
  { kind: 'attention', label: 'prefill, two key chunks, d=36', dtype: 'f16', n: 40, T: 2100, qHeads: 2, kvHeads: 2, headDim: 36 },
  { kind: 'attention', label: 'prefill non-causal, d=64', dtype: 'bf16', n: 24, T: 50, qHeads: 8, kvHeads: 8, headDim: 64, causal: false },
  { kind: 'cache', label: 'cache f16 store: prefill 30 + 10 steps, d=72', dtype: 'f32', n: 40, T: 40, qHeads: 8, kvHeads: 2, headDim: 72, store: 'f16', pageTokens: 7, prompt: 30 },
  // H2O's attention mass (transposed key blocks + score tile) at prefill and every step: what it keeps decides the outputs.
  { kind: 'cache', label: 'cache h2o: prefill 300 + 10 steps, d=40', dtype: 'f32', n: 310, T: 310, qHeads: 8, kvHeads: 2, headDim: 40, store: 'f16', pageTokens: 16, prompt: 300, select: { kind: 'h2o', budget: 96 } },
  // KIVI: append T tokens, then n queries attend (decode kernel over codes and residual rows).
  { kind: 'kivi', label: 'KIVI-2 decode, GQA 8/2, d=64, group 32', dtype: 'f32', n: 1, T: 1500, qHeads: 8, kvHeads: 2, headDim: 64, kivi: { bits: 2, group: 32, residual: 64 } },
  { kind: 'kivi', label: 'KIVI-4, 3 rows x group 4, d=128, group 16', dtype: 'f16', n: 3, T: 333, qHeads: 16, kvHeads: 4, headDim: 128, kivi: { bits: 4, group: 16, residual: 32 } },
  { kind: 'kivi', label: 'KIVI-8 MHA, d=32', dtype: 'bf16', n: 1, T: 700, qHeads: 2, kvHeads: 2, headDim: 32, kivi: { bits: 8, group: 32, residual: 128 } },
  { kind: 'kivi', label: 'KIVI-2 + 2% outliers, d=64', dtype: 'f32', n: 2, T: 500, qHeads: 8, kvHeads: 2, headDim: 64, kivi: { bits: 2, group: 32, residual: 64, outliers: 0.02 } },
  // A streaming window over KIVI: the hole's aligned inside is skipped, its edges masked.
  { kind: 'kivi', label: 'KIVI-2 streaming hole (sink 5, window 70), d=64', dtype: 'f32', n: 2, T: 900, qHeads: 8, kvHeads: 2, headDim: 64, kivi: { bits: 2, group: 32, residual: 64 }, select: { kind: 'streaming', sink: 5, window: 70 } },
  // ActQKV: the block scores are one fixed-order double sum (core/block_scores_args.h), so every level
  // loads exactly the reference's positions (d=100: twelve 8-wide chunks and a tail of 4).
  { kind: 'actqkv', label: 'actqkv: prefill 400 + 40 steps, GQA 8/2, d=100', dtype: 'f32', n: 440, T: 440, qHeads: 8, kvHeads: 2, headDim: 100, prompt: 400, actqkv: { sink: 8, window: 32, blockSize: 8, blocks: 6, reprTopK: 2, queryWindow: 16, questionWeight: 4, temperature: 0.05 } },
  // Index kernels: k as [T, headDim] keys, q as 3 query rows (qHeads = kvHeads = 1, n = 3).
  { kind: 'vectors', label: 'page bounds + flat top-20, d=100, 3 rows', dtype: 'f32', n: 3, T: 500, qHeads: 1, kvHeads: 1, headDim: 100 },
];

// Float64 Quest bounds of 16-key pages, then the 20 best max-over-rows scores, descending.
function vectorReference(q: Float32Array, k: Float32Array, rows: number, dim: number): Float64Array {
  const keys = k.length / dim;
  const rowScore = (r: number, key: number) => {
    let sum = 0;
    for (let d = 0; d < dim; d++) sum += q[r * dim + d] * k[key * dim + d];
    return sum;
  };
  const bounds: number[] = [];
  for (let first = 0; first < keys; first += 16) {
    let best = -Infinity;
    for (let r = 0; r < rows; r++) {
      let sum = 0;
      for (let d = 0; d < dim; d++) {
        let lo = Infinity, hi = -Infinity;
        for (let key = first; key < Math.min(keys, first + 16); key++) {
          lo = Math.min(lo, k[key * dim + d]);
          hi = Math.max(hi, k[key * dim + d]);
        }
        sum += Math.max(q[r * dim + d] * lo, q[r * dim + d] * hi);
      }
      best = Math.max(best, sum);
    }
    bounds.push(best);
  }
  const scores = Array.from({ length: keys }, (_, key) => Math.max(...Array.from({ length: rows }, (_, r) => rowScore(r, key))));
  scores.sort((a, b) => b - a);
  return Float64Array.from([...bounds, ...scores.slice(0, 20)]);
}

// The positions ActQKVReference loads per kv head after each step of the actqkv case (f32 store).
function actqkvReference(testCase: Case, q: Float32Array, k: Float32Array): Float64Array {
  const { qHeads, kvHeads, headDim } = testCase;
  const options = testCase.actqkv!;
  const reference = new ActQKVReference({ layers: 1, qHeads, kvHeads, headDim }, options);
  const qRow = qHeads * headDim, kvRow = kvHeads * headDim, p = testCase.prompt ?? 0;
  reference.appendKeys(0, k.subarray(0, p * kvRow));
  reference.addQueries(0, q.subarray(0, p * qRow));
  reference.catchUp(0);
  const positions: number[] = [];
  for (let t = p; t < testCase.T; t++) {
    reference.appendKeys(0, k.subarray(t * kvRow, (t + 1) * kvRow));
    const choice = reference.decode(0, q.subarray(t * qRow, (t + 1) * qRow));
    const tokens = t + 1;
    for (let h = 0; h < kvHeads; h++) {
      if (choice === null) positions.push(...Array.from({ length: tokens }, (_, i) => i));
      else positions.push(...Array.from({ length: options.sink }, (_, i) => i), ...choice.tokens[h], ...Array.from({ length: options.window }, (_, i) => tokens - options.window + i));
    }
  }
  return Float64Array.from(positions);
}

interface Prepared {
  json: Record<string, unknown>;
  expected: Float64Array;
}

function base64(array: Float32Array | Uint16Array): string {
  return Buffer.from(array.buffer, array.byteOffset, array.byteLength).toString('base64');
}

function prepare(testCase: Case, seed: number): Prepared {
  const random = new Random(seed);
  const q = random.tensor(testCase.n * testCase.qHeads * testCase.headDim);
  const k = random.tensor(testCase.T * testCase.kvHeads * testCase.headDim);
  const v = random.tensor(testCase.T * testCase.kvHeads * testCase.headDim);
  const { dtype } = testCase;
  const sent = dtype === 'f32' ? { q, k, v } : { q: encodeHalf(q, dtype), k: encodeHalf(k, dtype), v: encodeHalf(v, dtype) };
  if (testCase.kind === 'vectors') {
    return { json: { ...testCase, q: base64(q), k: base64(k), v: base64(v) }, expected: vectorReference(q, k, testCase.n, testCase.headDim) };
  }
  if (testCase.kind === 'actqkv') return { json: { ...testCase, q: base64(q), k: base64(k), v: base64(v) }, expected: actqkvReference(testCase, q, k) };
  if (testCase.kivi !== undefined) {
    const mirror = new KiviMirror(testCase, testCase.kivi);
    mirror.append(roundTo(k, dtype), roundTo(v, dtype));
    const json = { ...testCase, q: base64(sent.q), k: base64(sent.k), v: base64(sent.v) };
    if (testCase.select === undefined) return { json, expected: mirror.attend(roundTo(q, dtype)) };
    // A window policy: the positions it keeps, read from what the KIVI layer stores.
    const select = new SelectMirror({ layers: 1, ...testCase }, testCase.select);
    select.storedRows = () => mirror.stored();
    select.append(0, roundTo(k, dtype), roundTo(v, dtype));
    return { json, expected: select.attend(0, roundTo(q, dtype)) };
  }
  if (testCase.select !== undefined) {
    // The selection mirror in float64: the prompt prefilled, then one step per token.
    const { qHeads, kvHeads, headDim } = testCase;
    const mirror = new SelectMirror({ layers: 1, qHeads, kvHeads, headDim }, testCase.select, { store: testCase.store });
    const qRow = qHeads * headDim, kvRow = kvHeads * headDim, p = testCase.prompt ?? 0;
    const expected = new Float64Array(q.length);
    expected.set(mirror.prefill(0, q.subarray(0, p * qRow), k.subarray(0, p * kvRow), v.subarray(0, p * kvRow)), 0);
    for (let t = p; t < testCase.T; t++) {
      expected.set(mirror.step(0, q.subarray(t * qRow, (t + 1) * qRow), k.subarray(t * kvRow, (t + 1) * kvRow), v.subarray(t * kvRow, (t + 1) * kvRow)), t * qRow);
    }
    return { json: { ...testCase, q: base64(q), k: base64(k), v: base64(v) }, expected };
  }
  // Keys and values are rounded to the input dtype, then (in a cache) to the store dtype.
  const stored = (x: Float32Array) => roundTo(roundTo(x, dtype), testCase.store ?? 'f32');
  const expected = referenceAttention({
    q: roundTo(q, dtype), k: stored(k), v: stored(v),
    qHeads: testCase.qHeads, kvHeads: testCase.kvHeads, headDim: testCase.headDim,
    causal: testCase.causal, scale: testCase.scale,
  });
  return { json: { ...testCase, q: base64(sent.q), k: base64(sent.k), v: base64(sent.v) }, expected };
}

interface ChildResult {
  backends?: ReturnType<typeof backends>;
  outputs?: string[];
  importError?: { name: string; code: string; message: string };
}

let workDir = '';
let inputPath = '';
const prepared: Prepared[] = [];

function runChild(simd: string, extra: NodeJS.ProcessEnv = {}): ChildResult {
  const env: NodeJS.ProcessEnv = { ...process.env, KVSLIM_SIMD: simd, ...extra };
  const stdout = execFileSync(process.execPath, [child, inputPath], { env, encoding: 'utf8', timeout: 60_000 });
  return JSON.parse(stdout.trim().split('\n').at(-1) ?? '') as ChildResult;
}

function outputsOf(result: ChildResult): Float32Array[] {
  expect(result.importError).toBeUndefined();
  return (result.outputs ?? []).map((text) => {
    const bytes = Buffer.from(text, 'base64');
    const copy = new Uint8Array(bytes.length);
    copy.set(bytes);
    return new Float32Array(copy.buffer);
  });
}

beforeAll(() => {
  ensureCompiled();
  workDir = mkdtempSync(join(tmpdir(), 'kvslim-simd-'));
  inputPath = join(workDir, 'cases.json');
  cases.forEach((testCase, i) => prepared.push(prepare(testCase, 3000 + i)));
  writeFileSync(inputPath, JSON.stringify({ cases: prepared.map((p) => p.json) }));
});

afterAll(() => {
  if (workDir) rmSync(workDir, { recursive: true, force: true });
});

const cpu = backends().cpu;
const levels = [
  { simd: 'scalar', supported: true },
  { simd: 'avx2', supported: cpu.avx2 },
  { simd: 'avx512', supported: cpu.avx512 },
] as const;

describe('SIMD levels agree', () => {
  let scalar: Float32Array[] = [];

  for (const { simd, supported } of levels) {
    if (!supported) {
      // A level this CPU lacks cannot be forced: the import must say so instead of crashing.
      it(`KVSLIM_SIMD=${simd} on a CPU without it fails with ERR_OPTION`, () => {
        expect(runChild(simd).importError?.code).toBe('ERR_OPTION');
      });
      continue;
    }
    it(`KVSLIM_SIMD=${simd}: matches the reference${simd === 'scalar' ? '' : ' and the scalar twin'}`, () => {
      const result = runChild(simd);
      expect(result.backends?.cpu.simd).toBe(simd);
      expect(result.backends?.cpu.forced).toBe(simd);
      const outputs = outputsOf(result);
      expect(outputs).toHaveLength(cases.length);
      if (simd === 'scalar') scalar = outputs;
      else expect(scalar, 'the scalar level ran first').toHaveLength(cases.length);
      outputs.forEach((output, i) => {
        expect(output.length, cases[i].label).toBe(prepared[i].expected.length);
        expect(relativeL2(output, prepared[i].expected), `${cases[i].label} vs reference`).toBeLessThanOrEqual(REFERENCE_TOLERANCE);
        if (simd !== 'scalar') {
          expect(relativeL2(output, scalar[i]), `${cases[i].label} vs scalar`).toBeLessThanOrEqual(LEVEL_TOLERANCE);
        }
      });
    });
  }

  it('KVSLIM_SIMD=auto picks the best level this CPU has', () => {
    const result = runChild('auto');
    expect(result.backends?.cpu.simd).toBe(cpu.avx512 ? 'avx512' : cpu.avx2 ? 'avx2' : 'scalar');
    expect(outputsOf(result)).toHaveLength(cases.length);
  });

  it('KVSLIM_SIMD=bogus makes the import fail with ERR_OPTION', () => {
    const result = runChild('bogus');
    expect(result.outputs).toBeUndefined();
    expect(result.importError?.name).toBe('KVSlimError');
    expect(result.importError?.code).toBe('ERR_OPTION');
    expect(result.importError?.message).toMatch(/KVSLIM_SIMD/);
    expect(result.importError?.message).toMatch(/bogus/);
  });
});

// KVSLIM_PREFETCH only moves where the kernels' prefetches put streamed KV: the same level gives
// the same bits either way.
describe('KVSLIM_PREFETCH', () => {
  const best = cpu.avx512 ? 'avx512' : cpu.avx2 ? 'avx2' : 'scalar';

  it('l1 and l2: reported by backends(), outputs bit for bit the same', () => {
    const l1 = runChild(best, { KVSLIM_PREFETCH: 'l1' });
    const l2 = runChild(best, { KVSLIM_PREFETCH: 'l2' });
    expect(l1.backends?.cpu.prefetch).toBe('l1');
    expect(l2.backends?.cpu.prefetch).toBe('l2');
    const a = outputsOf(l1), b = outputsOf(l2);
    expect(a).toHaveLength(cases.length);
    a.forEach((output, i) => {
      expect(relativeL2(output, prepared[i].expected), `${cases[i].label} vs reference`).toBeLessThanOrEqual(REFERENCE_TOLERANCE);
      expect(Buffer.from(output.buffer).equals(Buffer.from(b[i].buffer)), `${cases[i].label}: l1 vs l2`).toBe(true);
    });
  });

  it('unset or auto: L1 on AMD (and Hygon), L2 on other vendors', () => {
    const expected = cpu.vendor === 'AuthenticAMD' || cpu.vendor === 'HygonGenuine' ? 'l1' : 'l2';
    expect(runChild(best, { KVSLIM_PREFETCH: 'auto' }).backends?.cpu.prefetch).toBe(expected);
    if (process.env.KVSLIM_PREFETCH === undefined) expect(cpu.prefetch).toBe(expected);
  });

  it('KVSLIM_PREFETCH=l3 makes the import fail with ERR_OPTION', () => {
    const result = runChild(best, { KVSLIM_PREFETCH: 'l3' });
    expect(result.outputs).toBeUndefined();
    expect(result.importError?.code).toBe('ERR_OPTION');
    expect(result.importError?.message).toMatch(/KVSLIM_PREFETCH must be l1, l2 or auto, but received 'l3'/);
  });
});
