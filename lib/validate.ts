// Option checks in the language the user writes (sharp style): each message names the argument,
// what was expected and what was received. C++ checks sizes again before touching memory.
import { describe, KVSlimError } from './errors.js';
import type { NativeDtype, NativeTensor } from './native.js';

/** Element type of an input tensor: f32 for Float32Array; f16 or bf16 for Uint16Array. */
export type Dtype = 'f32' | 'f16' | 'bf16';
/** A tensor as kvslim takes it: Float32Array, or Uint16Array holding f16 or bf16 bits. */
export type Tensor = Float32Array | Uint16Array;

export function optionError(message: string): KVSlimError {
  return new KVSlimError('ERR_OPTION', message);
}

export function positiveInteger(name: string, value: unknown, max = 2 ** 31 - 1): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1 || value > max) {
    throw optionError(`Expected a positive integer${max < 2 ** 31 - 1 ? ` up to ${max}` : ''} for ${name} but received ${describe(value)}`);
  }
  return value;
}

export function optionalPositiveInteger(name: string, value: unknown, fallback: number, max?: number): number {
  return value === undefined ? fallback : positiveInteger(name, value, max);
}

export function positiveNumber(name: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) {
    throw optionError(`Expected a positive finite number for ${name} but received ${describe(value)}`);
  }
  return value;
}

export function oneOf<T extends string>(name: string, value: unknown, allowed: readonly T[]): T {
  if (typeof value !== 'string' || !(allowed as readonly string[]).includes(value)) {
    throw optionError(`Expected one of ${allowed.map((a) => `'${a}'`).join(', ')} for ${name} but received ${describe(value)}`);
  }
  return value as T;
}

export function plainObject(name: string, value: unknown): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw optionError(`Expected an options object for ${name} but received ${describe(value)}`);
  }
  return value as Record<string, unknown>;
}

/** Unknown keys are errors: a typo such as `kvheads` must not silently fall back to a default. */
export function knownKeys(name: string, object: Record<string, unknown>, allowed: readonly string[]): void {
  for (const key of Object.keys(object)) {
    if (!allowed.includes(key)) {
      throw optionError(`Unknown option ${name}.${key}; expected one of ${allowed.join(', ')}`);
    }
  }
}

/** The dtype of a tensor argument, checked against its array type. */
export function tensorDtype(name: string, tensor: unknown, dtype: unknown): NativeDtype {
  if (tensor instanceof Float32Array) {
    if (dtype !== undefined && dtype !== 'f32') {
      throw new KVSlimError('ERR_DTYPE', `Expected dtype 'f32' (or none) for Float32Array ${name} but received ${describe(dtype)}`);
    }
    return 'f32';
  }
  if (tensor instanceof Uint16Array) {
    if (dtype !== 'f16' && dtype !== 'bf16') {
      throw new KVSlimError('ERR_DTYPE', `Expected dtype 'f16' or 'bf16' for Uint16Array ${name} but received ${describe(dtype)}`);
    }
    return dtype;
  }
  throw new KVSlimError('ERR_DTYPE', `Expected a Float32Array or Uint16Array for ${name} but received ${describe(tensor)}`);
}

/** All tensors of one call share a dtype; returns it. */
export function sharedDtype(tensors: Record<string, unknown>, dtype: unknown): NativeDtype {
  let shared: NativeDtype | undefined;
  for (const [name, tensor] of Object.entries(tensors)) {
    const own = tensorDtype(name, tensor, dtype);
    if (shared !== undefined && own !== shared) {
      throw new KVSlimError('ERR_DTYPE', `Expected ${Object.keys(tensors).join(', ')} to share one dtype but ${name} is ${own}`);
    }
    shared = own;
  }
  return shared as NativeDtype;
}

/** Number of rows n of a [n, heads, headDim] tensor; ERR_SHAPE unless its length is n x rowLength, n >= 1. */
export function rowsOf(name: string, tensor: NativeTensor, heads: number, headDim: number, headsName: string): number {
  const rowLength = heads * headDim;
  if (tensor.length === 0 || tensor.length % rowLength !== 0) {
    throw new KVSlimError(
      'ERR_SHAPE',
      `Expected ${name} to hold n x ${headsName} x headDim = n x ${heads} x ${headDim} elements (n >= 1) but received ${tensor.length}`,
    );
  }
  return tensor.length / rowLength;
}

/**
 * The caller's output array, checked: a Float32Array of `count` elements that shares no memory
 * with the inputs (the kernels read inputs while they write the output).
 */
export function outputArray(
  out: unknown, count: number, inputs: Record<string, Tensor>, shape = 'n x qHeads x headDim',
): Float32Array | undefined {
  if (out === undefined) return undefined;
  if (!(out instanceof Float32Array)) {
    throw new KVSlimError('ERR_DTYPE', `Expected a Float32Array for out but received ${describe(out)}`);
  }
  if (out.length !== count) {
    throw new KVSlimError('ERR_SHAPE', `Expected out to hold ${shape} = ${count} elements but received ${out.length}`);
  }
  for (const [name, input] of Object.entries(inputs)) {
    const overlaps = input.buffer === out.buffer &&
      input.byteOffset < out.byteOffset + out.byteLength && out.byteOffset < input.byteOffset + input.byteLength;
    if (overlaps) throw optionError(`Expected out to share no memory with ${name}`);
  }
  return out;
}
