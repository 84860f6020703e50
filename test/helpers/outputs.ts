// Assertions on attention outputs shared by the cache suites.
import { expect } from 'vitest';

import { relativeL2 } from './random.js';

/** A Float32Array of the expected length within `bound` relative L2 of `expected`. */
export function expectClose(actual: Float32Array, expected: ArrayLike<number>, what: string, bound: number): void {
  expect(actual, what).toBeInstanceOf(Float32Array);
  expect(actual.length, what).toBe(expected.length);
  expect(relativeL2(actual, expected), what).toBeLessThanOrEqual(bound);
}

/** Bit-identical outputs of two computations that must not differ (reports the first difference). */
export function expectIdentical(actual: Float32Array, expected: Float32Array, what: string): void {
  expect(actual, what).toBeInstanceOf(Float32Array);
  expect(actual.length, what).toBe(expected.length);
  for (let i = 0; i < expected.length; i++) {
    if (!Object.is(actual[i], expected[i])) expect.fail(`${what}: [${i}] ${actual[i]} != ${expected[i]}`);
  }
}
