// Reference of KIVI quantization (methods/kivi.md): the group quantizer in fp32 arithmetic
// (Math.fround after every operation, so codes, scales and zeros are bit-exact), the packed
// layouts of both axes, and a model of what a KIVI cache layer holds, for float64 attention over it.
//
// One group x_1..x_G: m = min, M = max, s = f16(fp32((M - m) / (2^bits - 1))), z = f16(m); a
// constant group (s == 0) takes s = 1. code = clamp(round((x - z) / s), 0, 2^bits - 1) with
// Math.round (ties up); x^ = code * s + z.
//
// Dense-and-sparse (KVQuant, policy.store.outliers = fraction f; native/core/kivi_format.h): per
// record (a key group: G tokens x channels, flat index t * channels + c; a value token: its
// channels) the round(f * record size) entries of largest |x| (ties: the lower index) are outliers.
// min/max of each quantization group leave them out (a group of nothing but outliers keeps the
// normal rule), every entry is still encoded (clamped), and each outlier stores
// delta = f16(fp32(x - x^)); the cache reads x^ + delta there.
import { referenceAttention } from './attention.js';
import { f16BitsToNumber, f32ToF16Bits, roundTo } from './half.js';

export type KiviAxis = 'channel' | 'token';
export type KiviBits = 2 | 4 | 8;

/** A quantized [tokens, channels] tensor in the documented layout (what quantize() returns). */
export interface ReferenceQuantized {
  axis: KiviAxis;
  bits: KiviBits;
  group: number;
  tokens: number;
  channels: number;
  /** channel: [tokens / group, channels, group * bits / 32]; token: [tokens, channels * bits / 32]. */
  codes: Uint32Array;
  /** channel: [tokens / group, channels]; token: [tokens, channels / group]. */
  scales: Float32Array;
  zeros: Float32Array;
  /** Dense-and-sparse: outliers per record (0 = off). */
  outliers?: number;
  /** [records, outliers]: index within the record (increasing), and f16 delta = x - x^. */
  outlierIndices?: Uint16Array;
  outlierDeltas?: Float32Array;
}

/** float32 -> nearest binary16 (ties to even), as a number. */
export function f16Round(x: number): number {
  return f16BitsToNumber(f32ToF16Bits(x));
}

/**
 * One group, step by step in fp32. `values` are float32 values. `skip` (dense-and-sparse): entries
 * left out of min/max, unless every entry is skipped; they are still encoded.
 */
export function quantizeGroup(
  values: ArrayLike<number>, bits: KiviBits, skip?: ArrayLike<boolean>,
): { scale: number; zero: number; codes: Int32Array } {
  const top = 2 ** bits - 1;
  let min = Infinity;
  let max = -Infinity;
  for (let pass = 0; pass < 2 && min === Infinity; pass++) {
    for (let i = 0; i < values.length; i++) {
      if (pass === 0 && skip?.[i]) continue;
      min = Math.min(min, values[i]);
      max = Math.max(max, values[i]);
    }
  }
  let scale = f16Round(Math.fround(Math.fround(max - min) / top));
  const zero = f16Round(min) + 0; // a zero minimum is +0, whichever zero came first (-0 + 0 is +0)
  if (scale === 0) scale = 1; // constant group: codes 0, x^ = z, no 0/0 (pitfall 4)
  const codes = new Int32Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const ratio = Math.fround(Math.fround(values[i] - zero) / scale);
    codes[i] = Math.min(top, Math.max(0, Math.round(ratio)));
  }
  return { scale, zero, codes };
}

/** The count outliers of a record: indices of the largest |x| (ties: lower index), increasing. */
export function selectOutliers(x: ArrayLike<number>, count: number): number[] {
  const order = Array.from({ length: x.length }, (_, i) => i);
  order.sort((a, b) => Math.abs(x[b]) - Math.abs(x[a]) || a - b);
  return order.slice(0, count).sort((a, b) => a - b);
}

/** Outliers per record for a fraction of `size` entries (round half up). */
export function outlierCount(fraction: number, size: number): number {
  return Math.round(fraction * size);
}

/** The stored delta of an outlier: f16(fp32(x - x^)). */
export function outlierDelta(x: number, xHat: number): number {
  return f16Round(Math.fround(x - xHat));
}

/** x^ of one code, in fp32. */
export function dequantizeCode(code: number, scale: number, zero: number): number {
  return Math.fround(Math.fround(code * scale) + zero);
}

/** Where a code sits: words[word] >>> shift, `bits` wide. */
export interface CodeLocation {
  word: number;
  shift: number;
  /** Index into scales and zeros. */
  group: number;
}

/** The location of element (token, channel) in the layout of `q`'s axis, bits and group. */
export function codeLocation(
  q: Pick<ReferenceQuantized, 'axis' | 'bits' | 'group' | 'tokens' | 'channels'>, token: number, channel: number,
): CodeLocation {
  const perWord = 32 / q.bits;
  if (q.axis === 'channel') {
    // A group is `group` consecutive tokens of one channel; its codes run along tokens.
    const block = Math.floor(token / q.group);
    const position = token % q.group;
    const wordsPerGroup = (q.group * q.bits) / 32;
    return {
      word: (block * q.channels + channel) * wordsPerGroup + Math.floor(position / perWord),
      shift: (position % perWord) * q.bits,
      group: block * q.channels + channel,
    };
  }
  // A group is `group` consecutive channels of one token; codes run along channels.
  const wordsPerToken = (q.channels * q.bits) / 32;
  return {
    word: token * wordsPerToken + Math.floor(channel / perWord),
    shift: (channel % perWord) * q.bits,
    group: token * (q.channels / q.group) + Math.floor(channel / q.group),
  };
}

/** The code of element (token, channel). */
export function unpackCode(q: ReferenceQuantized, token: number, channel: number): number {
  const { word, shift } = codeLocation(q, token, channel);
  return (q.codes[word] >>> shift) & (2 ** q.bits - 1);
}

export interface ReferenceQuantizeInput {
  /** Float32 values, row-major [tokens, channels]. */
  x: ArrayLike<number>;
  channels: number;
  axis: KiviAxis;
  bits: KiviBits;
  group: number;
  /** Dense-and-sparse: outliers per record (channel: per G tokens x channels; token: per token). */
  outliers?: number;
}

/** Quantizes and packs a whole tensor. Throws a plain Error on a shape the spec rejects. */
export function referenceQuantize(input: ReferenceQuantizeInput): ReferenceQuantized {
  const { x, channels, axis, bits, group } = input;
  const outliers = input.outliers ?? 0;
  const tokens = x.length / channels;
  if (!Number.isInteger(tokens)) throw new Error(`x.length ${x.length} is not a multiple of channels ${channels}`);
  if ((group * bits) % 32 !== 0) throw new Error(`group ${group} x bits ${bits} is not a whole number of words`);
  if (axis === 'channel' && tokens % group !== 0) throw new Error(`tokens ${tokens} % group ${group} != 0`);
  if (axis === 'token' && channels % group !== 0) throw new Error(`channels ${channels} % group ${group} != 0`);
  const groups = axis === 'channel' ? (tokens / group) * channels : tokens * (channels / group);
  const q: ReferenceQuantized = {
    axis, bits, group, tokens, channels,
    codes: new Uint32Array((tokens * channels * bits) / 32),
    scales: new Float32Array(groups),
    zeros: new Float32Array(groups),
  };
  // Dense-and-sparse: records and their outliers (flat positions in x).
  const recordSize = axis === 'channel' ? group * channels : channels;
  const records = (tokens * channels) / recordSize;
  const skip = new Uint8Array(tokens * channels);
  const chosen: number[][] = [];
  if (outliers > 0) {
    if (outliers > recordSize) throw new Error(`${outliers} outliers in records of ${recordSize}`);
    for (let r = 0; r < records; r++) {
      const record = Float32Array.from({ length: recordSize }, (_, i) => x[r * recordSize + i]);
      const picked = selectOutliers(record, outliers);
      chosen.push(picked);
      for (const i of picked) skip[r * recordSize + i] = 1;
    }
  }
  const values = new Float64Array(group);
  const skipped = new Array<boolean>(group);
  const members: Array<[number, number]> = new Array(group);
  for (let g = 0; g < groups; g++) {
    // Element i of group g as (token, channel).
    for (let i = 0; i < group; i++) {
      if (axis === 'channel') {
        const block = Math.floor(g / channels);
        members[i] = [block * group + i, g % channels];
      } else {
        const perToken = channels / group;
        members[i] = [Math.floor(g / perToken), (g % perToken) * group + i];
      }
      values[i] = Math.fround(x[members[i][0] * channels + members[i][1]]);
      skipped[i] = skip[members[i][0] * channels + members[i][1]] === 1;
    }
    const { scale, zero, codes } = quantizeGroup(values, bits, outliers > 0 ? skipped : undefined);
    q.scales[g] = scale;
    q.zeros[g] = zero;
    for (let i = 0; i < group; i++) {
      const location = codeLocation(q, members[i][0], members[i][1]);
      if (location.group !== g) throw new Error('codeLocation disagrees with the group walk');
      q.codes[location.word] = (q.codes[location.word] | (codes[i] << location.shift)) >>> 0;
    }
  }
  if (outliers > 0) {
    q.outliers = outliers;
    q.outlierIndices = new Uint16Array(records * outliers);
    q.outlierDeltas = new Float32Array(records * outliers);
    const xHat = referenceDequantize(q);
    for (let r = 0; r < records; r++) {
      chosen[r].forEach((i, k) => {
        const at = r * recordSize + i;
        q.outlierIndices![r * outliers + k] = i;
        q.outlierDeltas![r * outliers + k] = outlierDelta(Math.fround(x[at]), xHat[at]);
      });
    }
  }
  return q;
}

/** x^ [tokens, channels] from any tensor in the documented layout (outliers ignored, as dequantize() does). */
export function referenceDequantize(q: ReferenceQuantized): Float32Array {
  const out = new Float32Array(q.tokens * q.channels);
  for (let t = 0; t < q.tokens; t++) {
    for (let c = 0; c < q.channels; c++) {
      const { word, shift, group } = codeLocation(q, t, c);
      const code = (q.codes[word] >>> shift) & (2 ** q.bits - 1);
      out[t * q.channels + c] = dequantizeCode(code, q.scales[group], q.zeros[group]);
    }
  }
  return out;
}

/**
 * What a dense-and-sparse cache reads, [tokens, channels] in float64: x^, plus delta at the
 * outliers (the kernels add the deltas' contributions exactly: q_c * delta, p_t * delta).
 */
export function referenceReconstruct(q: ReferenceQuantized): Float64Array {
  const out = Float64Array.from(referenceDequantize(q));
  const outliers = q.outliers ?? 0;
  if (outliers > 0 && q.outlierIndices && q.outlierDeltas) {
    const recordSize = q.axis === 'channel' ? q.group * q.channels : q.channels;
    for (let i = 0; i < q.outlierIndices.length; i++) {
      out[Math.floor(i / outliers) * recordSize + q.outlierIndices[i]] += q.outlierDeltas[i];
    }
  }
  return out;
}

// ---- The KIVI cache ---------------------------------------------------------------------------

export interface KiviHeads {
  qHeads: number;
  kvHeads: number;
  headDim: number;
}

export interface KiviConfig {
  bits: KiviBits;
  /** G: tokens per key group, channels per value group. */
  group: number;
  /** R: the key buffer empties at R tokens; the last R values stay in f16. */
  residual: number;
  /** Dense-and-sparse fraction per vector (policy.store.outliers); default 0. */
  outliers?: number;
}

/** Outliers per key group record and per value token record of a KIVI cache. */
export function kiviOutliers(headDim: number, config: KiviConfig): { key: number; value: number } {
  const fraction = config.outliers ?? 0;
  return { key: outlierCount(fraction, config.group * headDim), value: outlierCount(fraction, headDim) };
}

/** Tokens of T whose keys are quantized: whole multiples of R (the key buffer empties at R). */
export function quantizedKeyTokens(tokens: number, residual: number): number {
  return Math.floor(tokens / residual) * residual;
}

/** Tokens of T whose values are quantized: all but the last R. */
export function quantizedValueTokens(tokens: number, residual: number): number {
  return Math.max(0, tokens - residual);
}

/** Bytes one kv head holds after T tokens: quantized records (codes + f16 scale and min) and f16 rows. */
export function kiviHeadBytes(tokens: number, headDim: number, config: KiviConfig): { kv: number; residual: number } {
  const { bits, group, residual } = config;
  const keyTokens = quantizedKeyTokens(tokens, residual);
  const valueTokens = quantizedValueTokens(tokens, residual);
  const outliers = kiviOutliers(headDim, config);  // 4 bytes each: uint16 index, f16 delta
  const keyGroupBytes = (headDim * group * bits) / 8 + 4 * headDim + 4 * outliers.key;
  const valueTokenBytes = (headDim * bits) / 8 + (4 * headDim) / group + 4 * outliers.value;
  return {
    kv: (keyTokens / group) * keyGroupBytes + valueTokens * valueTokenBytes,
    residual: (tokens - keyTokens + (tokens - valueTokens)) * headDim * 2,
  };
}

/** A growable float64 row store [rows, width]. */
class Rows {
  data: Float64Array;
  count = 0;
  constructor(readonly width: number, capacity = 64) {
    this.data = new Float64Array(capacity * width);
  }
  push(values: ArrayLike<number>): void {
    const rows = values.length / this.width;
    if (!Number.isInteger(rows)) throw new Error(`${values.length} values are not whole rows of ${this.width}`);
    this.reserve(this.count + rows);
    this.data.set(values, this.count * this.width);
    this.count += rows;
  }
  reserve(rows: number): void {
    if (rows * this.width <= this.data.length) return;
    const grown = new Float64Array(Math.max(rows, 2 * (this.data.length / this.width)) * this.width);
    grown.set(this.data.subarray(0, this.count * this.width));
    this.data = grown;
  }
  copy(): Rows {
    const copy = new Rows(this.width, Math.max(1, this.count));
    copy.push(this.data.subarray(0, this.count * this.width));
    return copy;
  }
}

/**
 * What one KIVI cache layer should hold. Keeps every appended key and value rounded to f16 and,
 * by the flush rules, the reference-dequantized keys (per channel, groups of G tokens, the first
 * floor(T/R)*R tokens) and values (per token, groups of G channels, the first max(0, T-R) tokens).
 * Groups never change once quantized (key flushes fall on multiples of R), so they are computed
 * once, when first needed.
 */
export class KiviMirror {
  readonly heads: KiviHeads;
  readonly config: KiviConfig;
  readonly #scale: number | undefined;
  #keys: Rows;       // f16-rounded, [T, kvHeads * headDim]
  #values: Rows;
  #keysHat: Rows;    // dequantized keys of the first keysHat.count tokens
  #valuesHat: Rows;

  constructor(heads: KiviHeads, config: KiviConfig, scale?: number) {
    if (config.residual % config.group !== 0 || heads.headDim % config.group !== 0) throw new Error('bad KIVI config');
    this.heads = heads;
    this.config = config;
    this.#scale = scale;
    const width = heads.kvHeads * heads.headDim;
    this.#keys = new Rows(width);
    this.#values = new Rows(width);
    this.#keysHat = new Rows(width);
    this.#valuesHat = new Rows(width);
  }

  get tokens(): number {
    return this.#keys.count;
  }

  /** Appends n tokens: k and v [n, kvHeads, headDim], the values the engine received. */
  append(k: ArrayLike<number>, v: ArrayLike<number>): void {
    if (k.length !== v.length) throw new Error('k and v differ in length');
    this.#keys.push(roundTo(k, 'f16'));
    this.#values.push(roundTo(v, 'f16'));
  }

  fork(): KiviMirror {
    const copy = new KiviMirror(this.heads, this.config, this.#scale);
    copy.#keys = this.#keys.copy();
    copy.#values = this.#values.copy();
    copy.#keysHat = this.#keysHat.copy();
    copy.#valuesHat = this.#valuesHat.copy();
    return copy;
  }

  /** The f16-rounded keys and values as appended, [T, kvHeads, headDim] (what an f16 cache holds). */
  exact(): { k: Float64Array; v: Float64Array } {
    const width = this.#keys.width;
    return {
      k: this.#keys.data.slice(0, this.tokens * width),
      v: this.#values.data.slice(0, this.tokens * width),
    };
  }

  /**
   * K and V as the cache reads them, [T, kvHeads, headDim]: dequantized where the flush rules
   * applied at `flushedAt` tokens (default: all of them) quantize, f16 elsewhere.
   */
  stored(flushedAt = this.tokens): { k: Float64Array; v: Float64Array } {
    const { residual } = this.config;
    const keyTokens = quantizedKeyTokens(flushedAt, residual);
    const valueTokens = quantizedValueTokens(flushedAt, residual);
    this.#quantizeKeysTo(keyTokens);
    this.#quantizeValuesTo(valueTokens);
    const { k, v } = this.exact();
    const width = this.#keys.width;
    k.set(this.#keysHat.data.subarray(0, keyTokens * width));
    v.set(this.#valuesHat.data.subarray(0, valueTokens * width));
    return { k, v };
  }

  /** Float64 causal attention of q [n, qHeads, headDim] over stored(flushedAt). */
  attend(q: ArrayLike<number>, flushedAt = this.tokens): Float64Array {
    const { k, v } = this.stored(flushedAt);
    return referenceAttention({ q, k, v, ...this.heads, causal: true, scale: this.#scale });
  }

  /** Float64 causal attention over the f16-rounded K and V, nothing quantized. */
  attendExact(q: ArrayLike<number>): Float64Array {
    const { k, v } = this.exact();
    return referenceAttention({ q, k, v, ...this.heads, causal: true, scale: this.#scale });
  }

  /**
   * The quantized rows of `from` (another mirror) for each kv head's first keep[h] tokens, where
   * both mirrors quantize them: as a store copies records instead of requantizing them (H2O's
   * compaction keeps the records before a head's first eviction).
   */
  adoptQuantized(from: KiviMirror, keep: number[]): void {
    const { kvHeads, headDim } = this.heads;
    const { residual, group } = this.config;
    const width = kvHeads * headDim;
    const keyTokens = quantizedKeyTokens(this.tokens, residual), valueTokens = quantizedValueTokens(this.tokens, residual);
    this.#quantizeKeysTo(keyTokens);
    this.#quantizeValuesTo(valueTokens);
    from.#quantizeKeysTo(quantizedKeyTokens(from.tokens, residual));
    from.#quantizeValuesTo(quantizedValueTokens(from.tokens, residual));
    for (let h = 0; h < kvHeads; h++) {
      const keys = Math.floor(Math.min(keep[h], from.#keysHat.count, keyTokens) / group) * group;
      const values = Math.min(keep[h], from.#valuesHat.count, valueTokens);
      for (let t = 0; t < keys; t++) {
        const at = t * width + h * headDim;
        this.#keysHat.data.set(from.#keysHat.data.subarray(at, at + headDim), at);
      }
      for (let t = 0; t < values; t++) {
        const at = t * width + h * headDim;
        this.#valuesHat.data.set(from.#valuesHat.data.subarray(at, at + headDim), at);
      }
    }
  }

  /** Bytes this layer should hold, summed over kv heads. */
  bytes(): { kv: number; residual: number } {
    const head = kiviHeadBytes(this.tokens, this.heads.headDim, this.config);
    return { kv: head.kv * this.heads.kvHeads, residual: head.residual * this.heads.kvHeads };
  }

  #quantizeKeysTo(tokens: number): void {
    const { kvHeads, headDim } = this.heads;
    const { bits, group } = this.config;
    const width = kvHeads * headDim;
    while (this.#keysHat.count < tokens) {
      // One group of G tokens, every head: axis 'channel' on that head's [G, headDim] keys.
      const first = this.#keysHat.count;
      const block = new Float64Array(group * width);
      for (let h = 0; h < kvHeads; h++) {
        const x = new Float32Array(group * headDim);
        for (let t = 0; t < group; t++) {
          const row = (first + t) * width + h * headDim;
          x.set(this.#keys.data.subarray(row, row + headDim), t * headDim);
        }
        const outliers = kiviOutliers(headDim, this.config).key;
        const xHat = referenceReconstruct(referenceQuantize({ x, channels: headDim, axis: 'channel', bits, group, outliers }));
        for (let t = 0; t < group; t++) block.set(xHat.subarray(t * headDim, (t + 1) * headDim), t * width + h * headDim);
      }
      this.#keysHat.push(block);
    }
  }

  #quantizeValuesTo(tokens: number): void {
    const { kvHeads, headDim } = this.heads;
    const { bits, group } = this.config;
    const width = kvHeads * headDim;
    while (this.#valuesHat.count < tokens) {
      // One token, every head: axis 'token' on that head's [1, headDim] values.
      const row = this.#valuesHat.count * width;
      const out = new Float64Array(width);
      for (let h = 0; h < kvHeads; h++) {
        const x = Float32Array.from(this.#values.data.subarray(row + h * headDim, row + (h + 1) * headDim));
        const outliers = kiviOutliers(headDim, this.config).value;
        out.set(referenceReconstruct(referenceQuantize({ x, channels: headDim, axis: 'token', bits, group, outliers })), h * headDim);
      }
      this.#valuesHat.push(out);
    }
  }
}

// ---- Pre-RoPE keys (policy.store.preRope) -----------------------------------------------------

export interface RopeSpec {
  theta: number;
  style: 'adjacent' | 'half';
}

/**
 * Rotary embedding in float64 of rows [T, heads, headDim] (a copy): row t turns pair i by
 * (firstPosition + t) * theta^(-2i/headDim); pairs (2i, 2i+1) ('adjacent') or (i, i + headDim/2) ('half').
 */
export function ropeRows(x: ArrayLike<number>, heads: number, headDim: number, rope: RopeSpec, firstPosition = 0): Float64Array {
  const out = Float64Array.from(x);
  const pairs = headDim / 2;
  const tokens = out.length / (heads * headDim);
  for (let t = 0; t < tokens; t++) {
    for (let i = 0; i < pairs; i++) {
      const angle = (firstPosition + t) * Math.pow(rope.theta, (-2 * i) / headDim);
      const c = Math.cos(angle), s = Math.sin(angle);
      for (let h = 0; h < heads; h++) {
        const base = (t * heads + h) * headDim;
        const a = base + (rope.style === 'adjacent' ? 2 * i : i);
        const b = base + (rope.style === 'adjacent' ? 2 * i + 1 : i + pairs);
        const xa = out[a], xb = out[b];
        out[a] = xa * c - xb * s;
        out[b] = xa * s + xb * c;
      }
    }
  }
  return out;
}

/**
 * Float64 causal attention of q [n, qHeads, headDim] over a pre-RoPE KIVI layer: the mirror's
 * stored keys (reference-dequantized pre-RoPE keys, f16 residual) rotated by their positions.
 */
export function attendPreRope(mirror: KiviMirror, q: ArrayLike<number>, rope: RopeSpec, flushedAt = mirror.tokens, scale?: number): Float64Array {
  const { k, v } = mirror.stored(flushedAt);
  const rotated = ropeRows(k, mirror.heads.kvHeads, mirror.heads.headDim, rope);
  return referenceAttention({ q, k: rotated, v, ...mirror.heads, causal: true, scale });
}
