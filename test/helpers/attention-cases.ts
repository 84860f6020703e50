// The attention() cases shared by attention.test.ts (CPU) and gpu.test.ts (CUDA): shapes chosen
// to hit each kernel path, each run on fresh seeded data against the float64 reference.
import { expect } from 'vitest';

import { type Device, attention } from '../../lib/index.js';
import { referenceAttention } from '../reference/attention.js';
import { type Dtype, encodeHalf, roundTo } from '../reference/half.js';
import { Random, maxAbsError, relativeL2 } from './random.js';

export interface Shape {
  n: number;
  T: number;
  qHeads: number;
  kvHeads: number;
  headDim: number;
  causal?: boolean;
  scale?: number;
  /** Multiplies q, to make the softmax peaked (a few keys dominate) instead of flat. */
  qScale?: number;
}

export interface CaseGroup {
  title: string;
  cases: Array<{ shape: Shape; dtypes: Dtype[] }>;
}

const ALL: Dtype[] = ['f32', 'f16', 'bf16'];
const each = (shape: Shape, dtypes: Dtype[] = ALL) => ({ shape, dtypes });

// CPU paths (native/cpu/cpu_backend.cc): decode when n x group <= 16 rows per kv head (row groups
// of 8; key splits of >= 1024 tokens), the tiled decode driver up to 256 rows (256-key f32 slices
// of the same splits), tiled prefill above (2048-key chunks, 64-row tiles).
export const ATTENTION_CASES: CaseGroup[] = [
  {
    title: 'decode, one query row per head (n = 1)',
    cases: [
      each({ n: 1, T: 1, qHeads: 4, kvHeads: 1, headDim: 64 }),
      each({ n: 1, T: 7, qHeads: 8, kvHeads: 8, headDim: 128 }),
      each({ n: 1, T: 333, qHeads: 8, kvHeads: 1, headDim: 80 }),
      each({ n: 1, T: 1025, qHeads: 4, kvHeads: 1, headDim: 72 }),
      each({ n: 1, T: 2049, qHeads: 2, kvHeads: 2, headDim: 100, causal: false }),
      each({ n: 1, T: 8192, qHeads: 8, kvHeads: 2, headDim: 128 }, ['f16']),
      each({ n: 1, T: 8191, qHeads: 4, kvHeads: 4, headDim: 72 }, ['bf16']),
    ],
  },
  {
    title: 'decode, several rows per kv head (n x group <= 16)',
    cases: [
      each({ n: 2, T: 2, qHeads: 4, kvHeads: 1, headDim: 64 }),
      each({ n: 3, T: 333, qHeads: 8, kvHeads: 2, headDim: 128 }),
      each({ n: 4, T: 1025, qHeads: 16, kvHeads: 4, headDim: 100 }),
      each({ n: 4, T: 3001, qHeads: 4, kvHeads: 1, headDim: 64 }, ['f32', 'f16']),
      each({ n: 2, T: 65, qHeads: 8, kvHeads: 1, headDim: 80 }),
      each({ n: 16, T: 40, qHeads: 2, kvHeads: 2, headDim: 72 }),
      each({ n: 3, T: 3, qHeads: 12, kvHeads: 3, headDim: 64, causal: false }),
    ],
  },
  {
    title: 'tiled (n x group > 16: the tiled decode driver to 256 rows, the prefill drivers above)',
    cases: [
      each({ n: 17, T: 17, qHeads: 2, kvHeads: 2, headDim: 64 }),
      each({ n: 70, T: 70, qHeads: 4, kvHeads: 1, headDim: 72 }),
      each({ n: 7, T: 7, qHeads: 8, kvHeads: 2, headDim: 80 }),
      each({ n: 333, T: 333, qHeads: 4, kvHeads: 1, headDim: 128 }),
      each({ n: 100, T: 1025, qHeads: 8, kvHeads: 1, headDim: 72 }, ['f32', 'bf16']),
      each({ n: 40, T: 2500, qHeads: 2, kvHeads: 2, headDim: 100 }, ['f32', 'f16']),
      each({ n: 33, T: 33, qHeads: 4, kvHeads: 4, headDim: 128, causal: false }),
      each({ n: 20, T: 9, qHeads: 4, kvHeads: 1, headDim: 64, causal: false }),
      each({ n: 65, T: 130, qHeads: 16, kvHeads: 2, headDim: 64 }),
    ],
  },
  {
    title: 'custom scale and peaked softmax',
    cases: [
      each({ n: 1, T: 500, qHeads: 4, kvHeads: 1, headDim: 128, scale: 0.3 }),
      each({ n: 3, T: 200, qHeads: 8, kvHeads: 2, headDim: 64, scale: 0.05 }),
      each({ n: 50, T: 300, qHeads: 2, kvHeads: 1, headDim: 80, scale: 1.7 }),
      each({ n: 1, T: 777, qHeads: 8, kvHeads: 1, headDim: 64, qScale: 4 }),
      each({ n: 48, T: 96, qHeads: 4, kvHeads: 2, headDim: 100, qScale: 4 }),
    ],
  },
];

export function label(shape: Shape, dtype: Dtype): string {
  const parts = [`n=${shape.n}`, `T=${shape.T}`, `heads=${shape.qHeads}/${shape.kvHeads}`, `d=${shape.headDim}`];
  if (shape.causal === false) parts.push('non-causal');
  if (shape.scale !== undefined) parts.push(`scale=${shape.scale}`);
  if (shape.qScale !== undefined) parts.push(`q x${shape.qScale}`);
  return `${parts.join(' ')} ${dtype}`;
}

export interface Comparison {
  /** The engine's output on each requested device, in order. */
  outputs: Float32Array[];
  expected: Float64Array;
  relative: number[];
  maxAbs: number[];
}

/** Runs one shape at one dtype on fresh data from `seed`, on each device; errors vs the reference. */
export function compareAttention(shape: Shape, dtype: Dtype, seed: number, devices: Device[] = ['cpu']): Comparison {
  const random = new Random(seed);
  const q = random.tensor(shape.n * shape.qHeads * shape.headDim, shape.qScale ?? 1);
  const k = random.tensor(shape.T * shape.kvHeads * shape.headDim);
  const v = random.tensor(shape.T * shape.kvHeads * shape.headDim);
  const common = {
    qHeads: shape.qHeads, kvHeads: shape.kvHeads, headDim: shape.headDim, causal: shape.causal, scale: shape.scale,
  };
  const inputs = dtype === 'f32'
    ? { q, k, v }
    : { q: encodeHalf(q, dtype), k: encodeHalf(k, dtype), v: encodeHalf(v, dtype), dtype };
  const outputs = devices.map((device) => attention({ ...inputs, ...common, device }));
  for (const out of outputs) {
    expect(out).toBeInstanceOf(Float32Array);
    expect(out.length).toBe(q.length);
  }
  // The reference sees exactly the values the engine received.
  const expected = referenceAttention({ q: roundTo(q, dtype), k: roundTo(k, dtype), v: roundTo(v, dtype), ...common });
  return {
    outputs, expected,
    relative: outputs.map((out) => relativeL2(out, expected)),
    maxAbs: outputs.map((out) => maxAbsError(out, expected)),
  };
}
