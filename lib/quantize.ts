// Stateless KIVI quantization (methods/kivi.md) for tools and tests: the same group quantizer and
// packing as the KIVI store, on one [tokens, channels] matrix.
import { addon } from './native.js';
import { knownKeys, oneOf, optionalPositiveInteger, optionError, plainObject, positiveInteger, type Dtype, tensorDtype, type Tensor } from './validate.js';

/**
 * One quantized matrix. Axis `channel` (how keys are quantized): a group is `group` consecutive
 * tokens of one channel; `scales`/`zeros` are `[tokens / group, channels]`, `codes` are
 * `[tokens / group, channels, group * bits / 32]` words. Axis `token` (values): a group is `group`
 * consecutive channels of one token; `scales`/`zeros` are `[tokens, channels / group]`, `codes`
 * `[tokens, channels * bits / 32]`. Codes pack `32 / bits` per word, least significant first;
 * x^ = code * scale + zero, with scale and zero (the group minimum) f16 values.
 */
export interface QuantizedTensor {
  axis: 'channel' | 'token';
  bits: 2 | 4 | 8;
  group: number;
  tokens: number;
  channels: number;
  codes: Uint32Array;
  scales: Float32Array;
  zeros: Float32Array;
}

export interface QuantizeOptions {
  /** Row-major `[tokens, channels]`. */
  x: Tensor;
  /** Required for a Uint16Array `x` (`f16` or `bf16`). */
  dtype?: Dtype;
  channels: number;
  axis: 'channel' | 'token';
  bits: 2 | 4 | 8;
  /** Elements per group; `group * bits` must be a multiple of 32. Default 32. */
  group?: number;
}

function bitsOf(name: string, value: unknown): 2 | 4 | 8 {
  if (value !== 2 && value !== 4 && value !== 8) throw optionError(`Expected 2, 4 or 8 for ${name} but received ${String(value)}`);
  return value;
}

/** Quantizes `x` as the KIVI store does (keys: axis `channel`; values: axis `token`). */
export function quantize(options: QuantizeOptions): QuantizedTensor {
  const o = plainObject('quantize options', options);
  knownKeys('quantize', o, ['x', 'dtype', 'channels', 'axis', 'bits', 'group']);
  const dtype = tensorDtype('x', o.x, o.dtype);
  const channels = positiveInteger('channels', o.channels);
  const axis = oneOf('axis', o.axis, ['channel', 'token'] as const);
  const bits = bitsOf('bits', o.bits);
  const group = optionalPositiveInteger('group', o.group, 32, 1 << 20);
  const result = addon.quantize({ x: o.x as Tensor, dtype, channels, axis, bits, group });
  return { axis, bits, group, tokens: result.tokens, channels, codes: result.codes, scales: result.scales, zeros: result.zeros };
}

/** x^ = code * scale + zero as a Float32Array `[tokens, channels]`. */
export function dequantize(quantized: QuantizedTensor): Float32Array {
  const o = plainObject('dequantize argument', quantized);
  return addon.dequantize({
    axis: oneOf('axis', o.axis, ['channel', 'token'] as const),
    bits: bitsOf('bits', o.bits),
    group: positiveInteger('group', o.group),
    channels: positiveInteger('channels', o.channels),
    tokens: positiveInteger('tokens', o.tokens, Number.MAX_SAFE_INTEGER),
    codes: o.codes as Uint32Array,
    scales: o.scales as Float32Array,
    zeros: o.zeros as Float32Array,
  });
}
