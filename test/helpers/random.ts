// Seeded random tensors and error measures shared by the kernel tests.

import { mulberry32 } from '../../lib/random.js';

export { mulberry32 };

/** A seeded source of standard normal samples (Box-Muller); never returns exactly 0. */
export class Random {
  readonly #uniform: () => number;
  #spare: number | null = null;

  constructor(seed: number) {
    this.#uniform = mulberry32(seed);
  }

  uniform(): number {
    return this.#uniform();
  }

  normal(): number {
    for (;;) {
      let value: number;
      if (this.#spare !== null) {
        value = this.#spare;
        this.#spare = null;
      } else {
        const u1 = 1 - this.#uniform(); // (0, 1]: log is finite
        const u2 = this.#uniform();
        const radius = Math.sqrt(-2 * Math.log(u1));
        value = radius * Math.cos(2 * Math.PI * u2);
        this.#spare = radius * Math.sin(2 * Math.PI * u2);
      }
      // A zero would make a wrongly-skipped element invisible; draw again.
      if (Math.fround(value) !== 0) return value;
    }
  }

  /** `length` normal samples times `scale`, as float32, none of them zero. */
  tensor(length: number, scale = 1): Float32Array {
    const out = new Float32Array(length);
    for (let i = 0; i < length; i++) {
      let value = 0;
      while (value === 0) value = Math.fround(this.normal() * scale);
      out[i] = value;
    }
    return out;
  }

  integer(below: number): number {
    return Math.floor(this.#uniform() * below);
  }
}

/** ||actual - expected||_2 / ||expected||_2. */
export function relativeL2(actual: ArrayLike<number>, expected: ArrayLike<number>): number {
  if (actual.length !== expected.length) throw new Error(`length ${actual.length} != ${expected.length}`);
  let diff = 0;
  let norm = 0;
  for (let i = 0; i < expected.length; i++) {
    diff += (actual[i] - expected[i]) ** 2;
    norm += expected[i] ** 2;
  }
  // NaN in actual must fail the comparison, not compare as small.
  if (Number.isNaN(diff)) return Infinity;
  return Math.sqrt(diff) / Math.sqrt(norm);
}

/** max_i |actual_i - expected_i| (Infinity when any element is NaN). */
export function maxAbsError(actual: ArrayLike<number>, expected: ArrayLike<number>): number {
  if (actual.length !== expected.length) throw new Error(`length ${actual.length} != ${expected.length}`);
  let max = 0;
  for (let i = 0; i < expected.length; i++) {
    const error = Math.abs(actual[i] - expected[i]);
    if (Number.isNaN(error)) return Infinity;
    if (error > max) max = error;
  }
  return max;
}

/** Rows [first, first + count) of a row-major tensor whose rows hold `rowLength` elements. */
export function rows<T extends Float32Array | Uint16Array | Float64Array>(
  tensor: T, rowLength: number, first: number, count: number,
): T {
  return tensor.subarray(first * rowLength, (first + count) * rowLength) as T;
}

/** Concatenation of same-typed tensors. */
export function concat<T extends Float32Array | Uint16Array | Float64Array>(parts: T[]): T {
  const length = parts.reduce((total, part) => total + part.length, 0);
  const out = new (parts[0].constructor as new (length: number) => T)(length);
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}
