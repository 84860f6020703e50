// The one assertion every bad-input test uses.
import { expect } from 'vitest';

import { KVSlimError } from '../../lib/index.js';

/** Asserts that `call` throws a KVSlimError with `code` whose message matches `message`. */
export function expectError(call: () => unknown, code: string, message?: RegExp): KVSlimError {
  let thrown: unknown;
  try {
    call();
  } catch (error) {
    thrown = error;
  }
  expect(thrown, `expected ${code}`).toBeInstanceOf(KVSlimError);
  const error = thrown as KVSlimError;
  expect(error.code, error.message).toBe(code);
  expect(error.name).toBe('KVSlimError');
  if (message) expect(error.message).toMatch(message);
  return error;
}
