// Q/K/V traces: what a model's attention layers saw, recorded once and replayed through any cache
// policy. A trace is a safetensors file (lib/trace/safetensors.ts) with, per layer i,
//   layers.{i}.q    F32 [n, qHeads, headDim]   queries, post-RoPE
//   layers.{i}.k    F32 [n, kvHeads, headDim]  keys, post-RoPE (what a server's cache holds)
//   layers.{i}.v    F32 [n, kvHeads, headDim]
//   layers.{i}.out  F32 [n, qHeads, headDim]   optional: the attention output the model used
// and a `__metadata__` of JSON strings: `format` = 'kvslim-trace/1', `config` (shapes and model
// facts), `tokens` (the n token ids, one per row), plus any extra fields of the caller.
import { readFileSync, writeFileSync } from 'node:fs';

import { describe, KVSlimError } from '../errors.js';
import { readSafetensors, type SafetensorsTensor, writeSafetensors } from './safetensors.js';

/** The `format` metadata value of traces this version writes and reads. */
export const TRACE_FORMAT = 'kvslim-trace/1';

/** Shapes of a trace, plus any model facts worth keeping (dim, vocabSize, rope, ...). */
export interface TraceConfig {
  layers: number;
  qHeads: number;
  kvHeads: number;
  headDim: number;
  [field: string]: unknown;
}

/** A trace's metadata: its config, the token ids of its n rows, and extra JSON-serialisable fields. */
export interface TraceMeta {
  config: TraceConfig;
  tokens: number[];
  [field: string]: unknown;
}

/** One layer of a trace: `q`/`out` are `[n, qHeads, headDim]`, `k`/`v` are `[n, kvHeads, headDim]`. */
export interface TraceLayer {
  q: Float32Array;
  k: Float32Array;
  v: Float32Array;
  out?: Float32Array;
}

/** A decoded trace: `layers[i]` holds layer i's tensors. */
export interface Trace {
  meta: TraceMeta;
  layers: TraceLayer[];
}

const SHAPE_FIELDS = ['layers', 'qHeads', 'kvHeads', 'headDim'] as const;

/** ERR_CORRUPT for read problems, ERR_SHAPE / ERR_OPTION for bad arguments to write. */
type Fail = (message: string) => KVSlimError;
const corrupt: Fail = (message) => new KVSlimError('ERR_CORRUPT', `Invalid kvslim trace: ${message}`);

function checkConfig(config: unknown, fail: Fail): TraceConfig {
  if (typeof config !== 'object' || config === null || Array.isArray(config)) {
    throw fail(`expected an object for config but received ${describe(config)}`);
  }
  const record = config as Record<string, unknown>;
  for (const field of SHAPE_FIELDS) {
    const value = record[field];
    if (typeof value !== 'number' || !Number.isInteger(value) || value < 1 || value > 65536) {
      throw fail(`expected a positive integer for config.${field} but received ${describe(value)}`);
    }
  }
  if ((record.qHeads as number) % (record.kvHeads as number) !== 0) {
    throw fail(`expected config.qHeads (${String(record.qHeads)}) to be a multiple of config.kvHeads (${String(record.kvHeads)})`);
  }
  return record as TraceConfig;
}

function checkTokens(tokens: unknown, fail: Fail): number[] {
  if (!Array.isArray(tokens) || !tokens.every((id) => Number.isSafeInteger(id) && id >= 0)) {
    throw fail(`expected tokens to be an array of non-negative integers but received ${describe(tokens)}`);
  }
  return tokens as number[];
}

/** Rows of every tensor of every layer; all must agree with the config and with tokens.length. */
function checkLayers(layers: readonly TraceLayer[], config: TraceConfig, rows: number, fail: Fail): void {
  if (layers.length !== config.layers) {
    throw fail(`expected ${config.layers} layers (config.layers) but received ${layers.length}`);
  }
  const qLength = rows * config.qHeads * config.headDim;
  const kvLength = rows * config.kvHeads * config.headDim;
  layers.forEach((layer, i) => {
    const expected: Array<[keyof TraceLayer, number]> = [['q', qLength], ['k', kvLength], ['v', kvLength]];
    if (layer.out !== undefined) expected.push(['out', qLength]);
    for (const [part, length] of expected) {
      const tensor = layer[part];
      if (!(tensor instanceof Float32Array)) {
        throw fail(`expected a Float32Array for layers.${i}.${part} but received ${describe(tensor)}`);
      }
      if (tensor.length !== length) {
        throw fail(`expected layers.${i}.${part} to hold ${length} elements (${rows} tokens) but received ${tensor.length}`);
      }
    }
  });
}

/**
 * Encodes a trace as safetensors bytes (what {@link writeTrace} writes). `layers[i].q` is
 * `[n, qHeads, headDim]`, `k`/`v` `[n, kvHeads, headDim]`, optional `out` like q, where n is
 * `meta.tokens.length`. Extra `meta` fields must be JSON-serialisable. Throws `ERR_SHAPE` or
 * `ERR_OPTION` naming the inconsistent part.
 */
export function encodeTrace(layers: readonly TraceLayer[], meta: TraceMeta): Buffer {
  const option: Fail = (message) => new KVSlimError('ERR_OPTION', `writeTrace: ${message}`);
  if (typeof meta !== 'object' || meta === null) throw option(`expected a meta object but received ${describe(meta)}`);
  if (!Array.isArray(layers)) throw option(`expected an array of layers but received ${describe(layers)}`);
  const config = checkConfig(meta.config, option);
  const tokens = checkTokens(meta.tokens, option);
  checkLayers(layers, config, tokens.length, (message) => new KVSlimError('ERR_SHAPE', `writeTrace: ${message}`));

  // fromEntries, not assignment: a field named __proto__ stays a field.
  const metadata: Record<string, string> = Object.fromEntries([['format', TRACE_FORMAT], ...Object.entries(meta).map(([field, value]) => {
    if (field === 'format') throw option(`meta.format is reserved (it is always '${TRACE_FORMAT}')`);
    const json = JSON.stringify(value);
    if (json === undefined) throw option(`expected a JSON-serialisable value for meta.${field} but received ${describe(value)}`);
    return [field, json];
  })]);
  const tensors: Record<string, SafetensorsTensor> = {};
  const { qHeads, kvHeads, headDim } = config;
  layers.forEach((layer, i) => {
    tensors[`layers.${i}.q`] = { dtype: 'F32', shape: [tokens.length, qHeads, headDim], data: layer.q };
    tensors[`layers.${i}.k`] = { dtype: 'F32', shape: [tokens.length, kvHeads, headDim], data: layer.k };
    tensors[`layers.${i}.v`] = { dtype: 'F32', shape: [tokens.length, kvHeads, headDim], data: layer.v };
    if (layer.out !== undefined) tensors[`layers.${i}.out`] = { dtype: 'F32', shape: [tokens.length, qHeads, headDim], data: layer.out };
  });
  return writeSafetensors(tensors, metadata);
}

/** Writes a trace file (safetensors; see {@link encodeTrace} for the shapes). */
export function writeTrace(path: string, layers: readonly TraceLayer[], meta: TraceMeta): void {
  writeFileSync(path, encodeTrace(layers, meta));
}

/**
 * Reads a trace from a file path or its bytes. Anything that is not a well-formed trace of this
 * format (bad safetensors, missing or misshapen tensors, wrong dtype, bad metadata) throws
 * `ERR_CORRUPT`. Tensors other than `layers.{i}.{q,k,v,out}` are ignored.
 */
export function readTrace(source: string | Uint8Array): Trace {
  const bytes = typeof source === 'string' ? readFileSync(source) : source;
  const { tensors, metadata } = readSafetensors(bytes);
  if (metadata.format !== TRACE_FORMAT) {
    throw corrupt(`expected __metadata__.format '${TRACE_FORMAT}' but found ${describe(metadata.format)}`);
  }
  // fromEntries, not assignment: a field named __proto__ stays a field.
  const meta: Record<string, unknown> = Object.fromEntries(Object.entries(metadata).filter(([field]) => field !== 'format').map(([field, json]) => {
    try {
      return [field, JSON.parse(json)];
    } catch {
      throw corrupt(`__metadata__.${field} is not valid JSON`);
    }
  }));
  const config = checkConfig(meta.config, corrupt);
  const tokens = checkTokens(meta.tokens, corrupt);

  const layers: TraceLayer[] = [];
  for (let i = 0; i < config.layers; i++) {
    const part = (name: 'q' | 'k' | 'v' | 'out'): Float32Array | undefined => {
      const tensor = tensors[`layers.${i}.${name}`];
      if (tensor === undefined) {
        if (name === 'out') return undefined;
        throw corrupt(`tensor layers.${i}.${name} is missing`);
      }
      if (tensor.dtype !== 'F32') throw corrupt(`tensor layers.${i}.${name} is ${tensor.dtype}, expected F32`);
      const heads = name === 'k' || name === 'v' ? config.kvHeads : config.qHeads;
      const expected = [tokens.length, heads, config.headDim];
      if (tensor.shape.length !== 3 || tensor.shape.some((dim, axis) => dim !== expected[axis])) {
        throw corrupt(`tensor layers.${i}.${name} has shape [${tensor.shape.join(', ')}], expected [${expected.join(', ')}]`);
      }
      return tensor.data as Float32Array;
    };
    const out = part('out');
    layers.push({ q: part('q') as Float32Array, k: part('k') as Float32Array, v: part('v') as Float32Array, ...(out ? { out } : {}) });
  }
  return { meta: { ...meta, config, tokens }, layers };
}
