// quantize() / dequantize() (KIVI, methods/kivi.md) against the fp32-exact reference in
// test/reference/kivi.ts: packed codes, scales and zeros bit for bit, on fresh seeded data of many
// shapes, every bit width and both axes.
import { describe, expect, it } from 'vitest';

import { KVSlimError, dequantize, quantize } from '../lib/index.js';
import { Random } from './helpers/random.js';
import { decodeHalf, encodeHalf } from './reference/half.js';
import {
  type KiviAxis, type KiviBits, type ReferenceQuantized, codeLocation, dequantizeCode, f16Round, kiviHeadBytes, kiviOutliers,
  outlierCount, outlierDelta, quantizeGroup, referenceDequantize, referenceQuantize, referenceReconstruct, selectOutliers,
  unpackCode,
} from './reference/kivi.js';

type QuantizedTensor = ReturnType<typeof quantize>;

const BITS: KiviBits[] = [2, 4, 8];

/** Asserts that `call` throws a KVSlimError with one of `codes` whose message matches `message`. */
function expectError(call: () => unknown, codes: string | string[], message?: RegExp): void {
  let thrown: unknown;
  try {
    call();
  } catch (error) {
    thrown = error;
  }
  const allowed = Array.isArray(codes) ? codes : [codes];
  expect(thrown, `expected ${allowed.join(' or ')}`).toBeInstanceOf(KVSlimError);
  const error = thrown as KVSlimError;
  expect(allowed, `${error.code}: ${error.message}`).toContain(error.code);
  if (message) expect(error.message).toMatch(message);
}

/** Bit-for-bit equality of two float32 arrays, reporting the first differing element. */
function expectSameFloats(actual: Float32Array, expected: Float32Array, what: string): void {
  expect(actual, what).toBeInstanceOf(Float32Array);
  expect(actual.length, `${what}: length`).toBe(expected.length);
  const a = new Uint32Array(actual.buffer, actual.byteOffset, actual.length);
  const e = new Uint32Array(expected.buffer, expected.byteOffset, expected.length);
  for (let i = 0; i < e.length; i++) {
    if (a[i] !== e[i]) expect.fail(`${what}[${i}]: ${actual[i]} where the reference has ${expected[i]}`);
  }
}

/** Exact equality of the packed words, reporting the first differing word. */
function expectSameWords(actual: Uint32Array, expected: Uint32Array, what: string): void {
  expect(actual, what).toBeInstanceOf(Uint32Array);
  expect(actual.length, `${what}: length`).toBe(expected.length);
  for (let i = 0; i < expected.length; i++) {
    if (actual[i] !== expected[i]) {
      expect.fail(`${what}[${i}]: 0x${actual[i].toString(16)} where the reference has 0x${expected[i].toString(16)}`);
    }
  }
}

/** The engine's result equals the reference's in every field, and dequantizes to the same values. */
function expectSameQuantized(q: QuantizedTensor, reference: ReferenceQuantized, what: string): void {
  const { axis, bits, group, tokens, channels } = reference;
  expect({ axis: q.axis, bits: q.bits, group: q.group, tokens: q.tokens, channels: q.channels }, what)
    .toEqual({ axis, bits, group, tokens, channels });
  expectSameFloats(q.scales, reference.scales, `${what}: scales`);
  expectSameFloats(q.zeros, reference.zeros, `${what}: zeros`);
  expectSameWords(q.codes, reference.codes, `${what}: codes`);
  expectSameFloats(dequantize(q), referenceDequantize(reference), `${what}: dequantize`);
}

// ---- Inputs -----------------------------------------------------------------------------------

/** Distributions that reach different corners of the quantizer; every value nonzero. */
const DISTRIBUTIONS: Record<string, (random: Random, tokens: number, channels: number) => Float32Array> = {
  normal: (random, tokens, channels) => random.tensor(tokens * channels),
  // Keys have outlier channels (KIVI section 3): some channels 30x larger, some 100x smaller.
  'outlier channels': (random, tokens, channels) => {
    const factor = Array.from({ length: channels }, () => [0.01, 1, 1, 30][random.integer(4)]);
    const x = random.tensor(tokens * channels);
    return x.map((value, i) => Math.fround(value * factor[i % channels]));
  },
  // f16 spacing is 0.5 near 1000: z = f16(m) misses m by up to 0.25, far more than s at 8 bits,
  // so codes clamp at 0 (z above m) and at 2^bits - 1 (z below m).
  'large offset': (random, tokens, channels) => random.tensor(tokens * channels).map((value) => 1000 + 0.5 * value),
  // Multiples of 1/8: repeated values, exact differences, constant runs in small groups.
  'coarse grid': (random, tokens, channels) =>
    Float32Array.from({ length: tokens * channels }, () => (random.integer(2) ? 1 : -1) * (1 + random.integer(12)) / 8),
  // Spreads whose f16 scale is subnormal or rounds to 0 (the s == 0 guard with M != m).
  'tiny spread': (random, tokens, channels) =>
    Float32Array.from({ length: tokens * channels }, () => 1 + random.integer(4) * 2 ** -23 * (random.integer(2) ? 1 : 300)),
};

interface QuantizeCase {
  tokens: number;
  channels: number;
  group: number;
}

// Channel axis: tokens a multiple of group. Token axis: channels a multiple of group. Groups of
// 4 and 8 only fit whole words at 8 (and 4) bits; 48 takes three words at 2 bits.
const CASES: Record<KiviAxis, QuantizeCase[]> = {
  channel: [
    { tokens: 32, channels: 1, group: 32 },
    { tokens: 96, channels: 7, group: 32 },
    { tokens: 48, channels: 128, group: 16 },
    { tokens: 128, channels: 33, group: 64 },
    { tokens: 12, channels: 5, group: 4 },
    { tokens: 24, channels: 9, group: 8 },
    { tokens: 96, channels: 3, group: 48 },
    { tokens: 256, channels: 64, group: 128 },
  ],
  token: [
    { tokens: 1, channels: 32, group: 32 },
    { tokens: 9, channels: 128, group: 32 },
    { tokens: 5, channels: 96, group: 48 },
    { tokens: 33, channels: 64, group: 16 },
    { tokens: 3, channels: 256, group: 64 },
    { tokens: 7, channels: 12, group: 4 },
    { tokens: 11, channels: 40, group: 8 },
    { tokens: 2, channels: 1024, group: 1024 },
  ],
};

const bitsFor = (group: number): KiviBits[] => BITS.filter((bits) => (group * bits) % 32 === 0);
const caseLabel = (axis: KiviAxis, c: QuantizeCase) => `axis ${axis}, [${c.tokens}, ${c.channels}], group ${c.group}`;

// ---- Tests ------------------------------------------------------------------------------------

describe('quantize: codes, scales and zeros equal the fp32 reference bit for bit', () => {
  let seed = 1000;
  for (const axis of ['channel', 'token'] as const) {
    for (const shape of CASES[axis]) {
      const caseSeed = seed++;
      it(`${caseLabel(axis, shape)}, bits ${bitsFor(shape.group).join('/')}, ${Object.keys(DISTRIBUTIONS).length} distributions`, () => {
        const random = new Random(caseSeed);
        for (const [name, draw] of Object.entries(DISTRIBUTIONS)) {
          for (const bits of bitsFor(shape.group)) {
            const x = draw(random, shape.tokens, shape.channels);
            const q = quantize({ x, channels: shape.channels, axis, bits, group: shape.group });
            const reference = referenceQuantize({ x, channels: shape.channels, axis, bits, group: shape.group });
            expectSameQuantized(q, reference, `${name}, bits ${bits}`);
          }
        }
      });
    }
  }

  it('the default group is 32', () => {
    const random = new Random(1100);
    for (const axis of ['channel', 'token'] as const) {
      const x = random.tensor(64 * 96);
      for (const bits of BITS) {
        const q = quantize({ x, channels: 96, axis, bits });
        expect(q.group).toBe(32);
        expectSameQuantized(q, referenceQuantize({ x, channels: 96, axis, bits, group: 32 }), `axis ${axis}, bits ${bits}`);
      }
    }
  });

  it('f16 and bf16 inputs quantize their decoded values', () => {
    const random = new Random(1101);
    for (const dtype of ['f16', 'bf16'] as const) {
      for (const axis of ['channel', 'token'] as const) {
        for (const bits of BITS) {
          const bitsIn = encodeHalf(random.tensor(32 * 64, 3), dtype);
          const decoded = Float32Array.from(decodeHalf(bitsIn, dtype));
          const q = quantize({ x: bitsIn, dtype, channels: 64, axis, bits, group: 16 });
          expectSameQuantized(q, referenceQuantize({ x: decoded, channels: 64, axis, bits, group: 16 }), `${dtype}, ${axis}, ${bits}`);
          const fromF32 = quantize({ x: decoded, dtype: 'f32', channels: 64, axis, bits, group: 16 });
          expectSameWords(q.codes, fromF32.codes, `${dtype} vs f32: codes`);
        }
      }
    }
  });

  it('scales and zeros are f16 values; every code fits its bits', () => {
    const random = new Random(1102);
    for (const axis of ['channel', 'token'] as const) {
      for (const bits of BITS) {
        const x = DISTRIBUTIONS['outlier channels'](random, 64, 64);
        const q = quantize({ x, channels: 64, axis, bits, group: 32 });
        for (const value of [...q.scales, ...q.zeros]) expect(f16Round(value)).toBe(value);
        for (const scale of q.scales) expect(scale).toBeGreaterThan(0);
        // The packing leaves no stray bits: re-packing the unpacked codes gives the same words.
        const repacked = new Uint32Array(q.codes.length);
        for (let t = 0; t < q.tokens; t++) {
          for (let c = 0; c < q.channels; c++) {
            const { word, shift } = codeLocation(q, t, c);
            repacked[word] = (repacked[word] | (unpackCode(q, t, c) << shift)) >>> 0;
          }
        }
        expectSameWords(q.codes, repacked, `axis ${axis}, bits ${bits}`);
      }
    }
  });
});

describe('quantize: arithmetic corners', () => {
  it('ties round half up (Math.round), with s and z exact in f16', () => {
    // z = 1 and s = 1/4 exactly; x = z + (k + 1/2) s gives the ratio k + 1/2 exactly, so the code is k + 1.
    for (const bits of BITS) {
      const top = 2 ** bits - 1;
      const group = 32;
      const steps = Array.from({ length: group - 2 }, (_, i) => i % top);
      const x = Float32Array.from([1, 1 + top / 4, ...steps.map((k) => 1 + (k + 0.5) / 4)]);
      const expectedCodes = [0, top, ...steps.map((k) => k + 1)];
      const group0 = quantizeGroup(x, bits);
      expect([group0.scale, group0.zero]).toEqual([0.25, 1]);
      for (const axis of ['channel', 'token'] as const) {
        const q = quantize({ x, channels: axis === 'token' ? group : 1, axis, bits, group });
        expect([q.scales[0], q.zeros[0]]).toEqual([0.25, 1]);
        const codes = Array.from({ length: group }, (_, i) => (axis === 'token' ? unpackCode(q, 0, i) : unpackCode(q, i, 0)));
        expect(codes, `bits ${bits}, axis ${axis}`).toEqual(expectedCodes);
      }
    }
  });

  it('constant groups: scale 1, codes 0, zero and x^ = f16(x), no NaN', () => {
    const random = new Random(1200);
    for (const axis of ['channel', 'token'] as const) {
      for (const bits of BITS) {
        const tokens = 64, channels = 64, group = 32;
        const x = random.tensor(tokens * channels);
        // Every other group constant, at a value f16 cannot hold exactly (so z != x there).
        const constant = new Map<number, number>();
        const probe = { axis, bits, group, tokens, channels };
        for (let t = 0; t < tokens; t++) {
          for (let c = 0; c < channels; c++) {
            const g = codeLocation(probe, t, c).group;
            if (g % 2 === 1) continue;
            if (!constant.has(g)) constant.set(g, Math.fround(0.1 + random.normal()));
            x[t * channels + c] = constant.get(g)!;
          }
        }
        const q = quantize({ x, channels, axis, bits, group });
        expectSameQuantized(q, referenceQuantize({ x, channels, axis, bits, group }), `axis ${axis}, bits ${bits}`);
        const xHat = dequantize(q);
        expect(xHat.every(Number.isFinite)).toBe(true);
        for (let t = 0; t < tokens; t++) {
          for (let c = 0; c < channels; c++) {
            const g = codeLocation(q, t, c).group;
            const value = constant.get(g);
            if (value === undefined) continue;
            expect(f16Round(value)).not.toBe(value);
            expect([q.scales[g], q.zeros[g], unpackCode(q, t, c), xHat[t * channels + c]]).toEqual([1, f16Round(value), 0, f16Round(value)]);
          }
        }
      }
    }
  });

  it('a whole tensor of one value, and groups whose scale underflows f16 (s = 0 -> 1)', () => {
    for (const axis of ['channel', 'token'] as const) {
      for (const bits of BITS) {
        const x = new Float32Array(32 * 32).fill(Math.fround(-3.14159));
        const q = quantize({ x, channels: 32, axis, bits, group: 32 });
        expect(q.codes.every((word) => word === 0)).toBe(true);
        expect(Array.from(dequantize(q)).every((value) => value === f16Round(-3.14159))).toBe(true);
        // M - m = 2^-22: (M - m) / (2^bits - 1) is below half the smallest f16 subnormal at 4 and 8 bits.
        const spread = x.map((_, i) => 1 + (i % 3) * 2 ** -23);
        const tiny = quantize({ x: spread, channels: 32, axis, bits, group: 32 });
        const reference = referenceQuantize({ x: spread, channels: 32, axis, bits, group: 32 });
        if (bits !== 2) expect(reference.scales.every((scale) => scale === 1)).toBe(true);
        expectSameQuantized(tiny, reference, `axis ${axis}, bits ${bits}`);
        expect(dequantize(tiny).every(Number.isFinite)).toBe(true);
      }
    }
  });

  it('a group minimum of zero is stored as +0, whichever zero comes first, also where a later lane of the scan meets the other zero first', () => {
    const random = new Random(1202);
    for (const axis of ['channel', 'token'] as const) {
      for (const bits of BITS) {
        for (const [firstZero, laterZero] of [[-0, 0], [0, -0]]) {
          const tokens = 64, channels = 64, group = 32;
          const x = random.tensor(tokens * channels).map((value) => Math.fround(Math.abs(value) + 0.01));
          const probe = { axis, bits, group, tokens, channels };
          // Per group: one zero at a random member, then the other at a later member whose index
          // mod 8 (its lane in the 8-lane min scan of a token group) is lower, so a lane-order
          // reduction meets the later zero first.
          const members = new Map<number, number[]>();
          for (let i = 0; i < tokens * channels; i++) {
            const g = codeLocation(probe, Math.floor(i / channels), i % channels).group;
            members.set(g, [...(members.get(g) ?? []), i]);
          }
          for (const list of members.values()) {
            const first = 8 * random.integer(2) + 1 + random.integer(7);  // lane 1..7, member < 16
            const later = first - (first % 8) + 8 + random.integer(first % 8);  // a lower lane, member < 24
            x[list[first]] = firstZero;
            x[list[later]] = laterZero;
          }
          const what = `axis ${axis}, bits ${bits}, ${Object.is(firstZero, -0) ? '-0' : '+0'} first`;
          const q = quantize({ x, channels, axis, bits, group });
          expectSameQuantized(q, referenceQuantize({ x, channels, axis, bits, group }), what);
          for (const zero of q.zeros) expect(Object.is(zero, 0), what).toBe(true);
          // Either zero dequantizes every code alike: the stored sign changes no value.
          expectSameFloats(dequantize(q), dequantize({ ...q, zeros: q.zeros.map(() => -0) }), `${what}: dequantize with -0`);
        }
      }
    }
  });

  it('codes clamp at 0 and at 2^bits - 1 where f16 rounding of z and s overshoots', () => {
    const random = new Random(1201);
    for (const axis of ['channel', 'token'] as const) {
      for (const bits of BITS) {
        const x = DISTRIBUTIONS['large offset'](random, 64, 64);
        const reference = referenceQuantize({ x, channels: 64, axis, bits, group: 32 });
        // The data reaches both clamps (else this test would not test them).
        let below = 0, above = 0;
        for (let t = 0; t < 64; t++) {
          for (let c = 0; c < 64; c++) {
            const { group } = codeLocation(reference, t, c);
            const ratio = (x[t * 64 + c] - reference.zeros[group]) / reference.scales[group];
            if (ratio < -0.5) below++;
            if (ratio >= 2 ** bits - 0.5) above++;
          }
        }
        // At 2 bits s/2 exceeds the f16 spacing near 1000, so only 4 and 8 bits clamp.
        if (bits !== 2) expect([below, above].every((count) => count > 0), `bits ${bits}, axis ${axis}: ${below} below, ${above} above`).toBe(true);
        expectSameQuantized(quantize({ x, channels: 64, axis, bits, group: 32 }), reference, `axis ${axis}, bits ${bits}`);
      }
    }
  });
});

describe('quantize -> dequantize round trip', () => {
  let seed = 1300;
  for (const axis of ['channel', 'token'] as const) {
    for (const shape of CASES[axis]) {
      const caseSeed = seed++;
      // The bound needs s at full f16 precision: a subnormal s (below 2^-14) can be off by more than
      // s / (2 (2^bits - 1)), and the top codes then fall short. Such groups are counted, not checked.
      it(`|x - x^| <= s/2 + |m - z| + 1e-6|x| per element: ${caseLabel(axis, shape)}`, () => {
        const random = new Random(caseSeed);
        for (const name of ['normal', 'outlier channels', 'large offset'] as const) {
          const meanError: number[] = [];
          for (const bits of bitsFor(shape.group)) {
            const x = DISTRIBUTIONS[name](random, shape.tokens, shape.channels);
            const q = quantize({ x, channels: shape.channels, axis, bits, group: shape.group });
            const xHat = dequantize(q);
            expect(xHat).toBeInstanceOf(Float32Array);
            expect(xHat.length).toBe(x.length);
            // Group minima from x itself; s and z from the engine's output.
            const min = new Float64Array(q.scales.length).fill(Infinity);
            for (let t = 0; t < shape.tokens; t++) {
              for (let c = 0; c < shape.channels; c++) {
                const g = codeLocation(q, t, c).group;
                min[g] = Math.min(min[g], x[t * shape.channels + c]);
              }
            }
            let total = 0, checked = 0;
            for (let t = 0; t < shape.tokens; t++) {
              for (let c = 0; c < shape.channels; c++) {
                const i = t * shape.channels + c;
                const g = codeLocation(q, t, c).group;
                const error = Math.abs(x[i] - xHat[i]);
                total += error;
                if (q.scales[g] < 2 ** -14) continue;
                checked++;
                const bound = q.scales[g] / 2 + Math.abs(min[g] - q.zeros[g]) + 1e-6 * Math.abs(x[i]);
                if (!(error <= bound)) expect.fail(`${name}, bits ${bits}, [${t}, ${c}]: |${x[i]} - ${xHat[i]}| > ${bound}`);
              }
            }
            expect(checked, `${name}, bits ${bits}: elements checked`).toBeGreaterThanOrEqual(0.9 * x.length);
            meanError.push(total / x.length);
          }
          // Lossy, and less so with more bits (normal data: each extra 2 bits cut the error ~4x).
          expect(meanError[0], name).toBeGreaterThan(0);
          if (name === 'normal') {
            for (let i = 1; i < meanError.length; i++) expect(meanError[i], name).toBeLessThan(meanError[i - 1] / 2);
          }
        }
      });
    }
  }
});

describe('dequantize reads the documented layout', () => {
  it('arbitrary codes, f16 scales and zeros in plain objects (not from quantize)', () => {
    const random = new Random(1400);
    for (const axis of ['channel', 'token'] as const) {
      for (const shape of CASES[axis]) {
        for (const bits of bitsFor(shape.group)) {
          const { tokens, channels, group } = shape;
          const groups = axis === 'channel' ? (tokens / group) * channels : tokens * (channels / group);
          const tensor: ReferenceQuantized = {
            axis, bits, group, tokens, channels,
            codes: Uint32Array.from({ length: (tokens * channels * bits) / 32 }, () => Math.floor(random.uniform() * 2 ** 32)),
            scales: Float32Array.from({ length: groups }, () => f16Round(0.01 + Math.abs(random.normal()))),
            zeros: Float32Array.from({ length: groups }, () => f16Round(random.normal() * 4)),
          };
          const what = `${caseLabel(axis, shape)}, bits ${bits}`;
          expectSameFloats(dequantize({ ...tensor }), referenceDequantize(tensor), what);
        }
      }
    }
  });
});

describe('quantize: bad input', () => {
  const random = new Random(1500);
  const x = random.tensor(64 * 32);
  const base = { x, channels: 32, axis: 'channel' as const, bits: 2 as const, group: 32 };

  it('bits not 2, 4 or 8 (ERR_OPTION)', () => {
    for (const bits of [1, 3, 16, 0, -2, 2.5, Number.NaN, '2', null]) {
      expectError(() => quantize({ ...base, bits: bits as never }), 'ERR_OPTION', /bits/);
    }
    expectError(() => quantize({ x, channels: 32, axis: 'channel', group: 32 } as never), 'ERR_OPTION', /bits/);
  });

  it('group not a positive integer, or group * bits not a multiple of 32 (ERR_OPTION)', () => {
    for (const group of [0, -32, 1.5, Number.NaN, Number.POSITIVE_INFINITY, '32', null]) {
      expectError(() => quantize({ ...base, group: group as never }), 'ERR_OPTION', /group/);
    }
    for (const [bits, group] of [[2, 8], [2, 24], [4, 4], [4, 12], [8, 2], [8, 6]] as const) {
      const tokens = 96 * group; // divisible, so only the word rule fails
      expectError(() => quantize({ ...base, x: random.tensor(tokens), channels: 1, bits, group }), 'ERR_OPTION', /group/);
    }
  });

  it('axis not channel or token (ERR_OPTION); unknown keys (ERR_OPTION)', () => {
    for (const axis of ['row', 'tokens', '', undefined, 1]) {
      expectError(() => quantize({ ...base, axis: axis as never }), 'ERR_OPTION', /axis/);
    }
    expectError(() => quantize({ ...base, groupSize: 32 } as never), 'ERR_OPTION', /groupSize/);
    expectError(() => quantize(null as never), 'ERR_OPTION');
  });

  it('channels not a positive integer', () => {
    for (const channels of [0, -32, 2.5, Number.NaN, '32', undefined]) {
      expectError(() => quantize({ ...base, channels: channels as never }), ['ERR_OPTION', 'ERR_SHAPE'], /channels/);
    }
  });

  it('x.length not a multiple of channels; tokens or channels not a multiple of group (ERR_SHAPE)', () => {
    expectError(() => quantize({ ...base, x: x.subarray(1) }), 'ERR_SHAPE');
    expectError(() => quantize({ ...base, channels: 48 }), 'ERR_SHAPE');
    // 48 tokens of 32 channels: fine per token, not per channel in groups of 32.
    const x48 = x.subarray(0, 48 * 32);
    expectError(() => quantize({ ...base, x: x48 }), 'ERR_SHAPE');
    expect(quantize({ ...base, x: x48, axis: 'token' }).tokens).toBe(48);
    // 64 tokens of 48 channels: fine per channel, not per token in groups of 32.
    const x48c = random.tensor(64 * 48);
    expectError(() => quantize({ ...base, x: x48c, channels: 48, axis: 'token' }), 'ERR_SHAPE');
    expect(quantize({ ...base, x: x48c, channels: 48 }).channels).toBe(48);
  });

  it('x of the wrong type, or Uint16Array without an f16/bf16 dtype (ERR_DTYPE)', () => {
    expectError(() => quantize({ ...base, x: new Float64Array(x) as never }), 'ERR_DTYPE');
    expectError(() => quantize({ ...base, x: Array.from(x) as never }), 'ERR_DTYPE');
    expectError(() => quantize({ ...base, x: encodeHalf(x, 'f16') }), 'ERR_DTYPE');
    expectError(() => quantize({ ...base, x: encodeHalf(x, 'f16'), dtype: 'f32' }), 'ERR_DTYPE');
    expectError(() => quantize({ ...base, dtype: 'bf16' }), 'ERR_DTYPE');
  });

  // Beyond f16, a group's scale (1e6 / 3) or zero (f16(-1e6)) has no f16 value.
  it('a group whose scale or zero overflows f16 (ERR_VALUE)', () => {
    for (const value of [1e6, -1e6, -65520]) {
      const bad = x.slice();
      bad[100] = value;
      expectError(() => quantize({ ...base, x: bad }), 'ERR_VALUE');
      expectError(() => quantize({ ...base, x: bad, axis: 'token' }), 'ERR_VALUE');
    }
  });

  it('NaN or Infinity anywhere in x, in every dtype (ERR_VALUE)', () => {
    for (const value of [Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY]) {
      for (const index of [0, 777, x.length - 1]) {
        const bad = x.slice();
        bad[index] = value;
        expectError(() => quantize({ ...base, x: bad }), 'ERR_VALUE');
        expectError(() => quantize({ ...base, x: bad, axis: 'token', bits: 8 }), 'ERR_VALUE');
      }
    }
    for (const [dtype, infinity, nan] of [['f16', 0x7c00, 0x7e00], ['bf16', 0x7f80, 0x7fc0]] as const) {
      for (const bits of [infinity, nan, infinity | 0x8000]) {
        const bad = encodeHalf(x, dtype);
        bad[1234] = bits;
        expectError(() => quantize({ ...base, x: bad, dtype }), 'ERR_VALUE');
      }
    }
  });
});

describe('dequantize: bad input', () => {
  const random = new Random(1600);
  const q = quantize({ x: random.tensor(64 * 32), channels: 32, axis: 'channel', bits: 4, group: 32 });

  it('codes, scales or zeros of the wrong length, or tokens that disagree with them (ERR_SHAPE)', () => {
    expectError(() => dequantize({ ...q, codes: q.codes.subarray(1) }), 'ERR_SHAPE', /codes/);
    expectError(() => dequantize({ ...q, scales: q.scales.subarray(1) }), 'ERR_SHAPE', /scales/);
    expectError(() => dequantize({ ...q, zeros: q.zeros.subarray(0, 10) }), 'ERR_SHAPE', /zeros/);
    expectError(() => dequantize({ ...q, tokens: 96 }), 'ERR_SHAPE');
    expectError(() => dequantize({ ...q, tokens: 48 }), 'ERR_SHAPE');
    expectError(() => dequantize({ ...q, axis: 'token', group: 64 }), 'ERR_SHAPE');
  });

  it('scales or zeros that are not finite f16 values (ERR_VALUE)', () => {
    const random = new Random(1601);
    for (const field of ['scales', 'zeros'] as const) {
      for (let trial = 0; trial < 4; trial++) {
        const values = q[field].slice();
        const at = random.integer(values.length);
        // Between two f16 neighbours: f32 holds it, f16 does not.
        values[at] = Math.fround(values[at] * (1 + 2 ** -13) + (values[at] === 0 ? 2 ** -20 : 0));
        expect(f16Round(values[at]), `${field} trial ${trial}`).not.toBe(values[at]);
        expectError(() => dequantize({ ...q, [field]: values }), 'ERR_VALUE', /f16/);
      }
      // Infinities are f16 values too, but would dequantize to infinities and NaN.
      for (const bad of [Infinity, -Infinity, NaN]) {
        const values = q[field].slice();
        values[random.integer(values.length)] = bad;
        expectError(() => dequantize({ ...q, [field]: values }), 'ERR_VALUE', /finite f16/);
      }
    }
  });

  it('arrays of the wrong type (ERR_DTYPE); bad axis, bits or group (ERR_OPTION)', () => {
    expectError(() => dequantize({ ...q, codes: new Float32Array(q.codes.length) as never }), 'ERR_DTYPE', /codes/);
    expectError(() => dequantize({ ...q, scales: new Float64Array(q.scales) as never }), 'ERR_DTYPE', /scales/);
    expectError(() => dequantize({ ...q, axis: 'row' as never }), 'ERR_OPTION', /axis/);
    expectError(() => dequantize({ ...q, bits: 3 as never }), 'ERR_OPTION', /bits/);
    expectError(() => dequantize({ ...q, group: 0 }), 'ERR_OPTION', /group/);
  });
});

// The dense-and-sparse reference (KVQuant per-vector outliers; the cache's policy.store.outliers,
// tested end to end in kivi-cache.test.ts). quantize() / dequantize() ignore outliers.
describe('reference: dense-and-sparse outliers', () => {
  it('selection: largest |x| first, ties to the lower index, returned in increasing order', () => {
    expect(selectOutliers([1, -5, 3, 5, -3, 0], 2)).toEqual([1, 3]);
    expect(selectOutliers([1, -5, 3, 5, -3, 0], 3)).toEqual([1, 2, 3]);
    expect(selectOutliers([2, 2, 2, 2], 2)).toEqual([0, 1]);
    expect(selectOutliers([0, -0, 0], 1)).toEqual([0]);
    expect(selectOutliers([1, 2, 3], 0)).toEqual([]);
    expect(selectOutliers([1, 2, 3], 3)).toEqual([0, 1, 2]);
  });

  it('counts: round(fraction x record size) per key group and per value token', () => {
    expect(outlierCount(0.01, 32 * 128)).toBe(41);
    expect(outlierCount(0.01, 128)).toBe(1);
    expect(outlierCount(0.004, 64)).toBe(0);
    expect(kiviOutliers(128, { bits: 2, group: 32, residual: 128, outliers: 0.01 })).toEqual({ key: 41, value: 1 });
    expect(kiviOutliers(128, { bits: 2, group: 32, residual: 128 })).toEqual({ key: 0, value: 0 });
    // 4 bytes per outlier: at T = 256, R = 128: 8 key groups of 41, 128 value tokens of 1.
    const plain = kiviHeadBytes(256, 128, { bits: 2, group: 32, residual: 128 }).kv;
    expect(kiviHeadBytes(256, 128, { bits: 2, group: 32, residual: 128, outliers: 0.01 }).kv - plain).toBe(4 * (8 * 41 + 128));
  });

  it('min and max leave the outliers out; a group of nothing but outliers keeps the normal rule', () => {
    const values = [0.5, -0.25, 100, 0.75];
    const skip = [false, false, true, false];
    const sparse = quantizeGroup(values, 2, skip);
    expect(sparse.zero).toBe(-0.25);
    expect(sparse.scale).toBe(f16Round(Math.fround(1 / 3)));
    expect(sparse.codes[2]).toBe(3);  // still encoded, clamped
    const dense = quantizeGroup(values, 2);
    expect(quantizeGroup(values, 2, [true, true, true, true])).toEqual(dense);
    expect(quantizeGroup(values, 2, [false, false, false, false])).toEqual(dense);
  });

  it('delta = f16(fp32(x - x^)), and x^ + delta recovers x to f16 rounding of the delta', () => {
    expect(outlierDelta(100, 0.5)).toBe(99.5);
    expect(outlierDelta(1000.3, 0.1)).toBe(f16Round(Math.fround(1000.3 - 0.1)));
    expect(outlierDelta(Math.fround(1 / 3), 0)).toBe(f16Round(Math.fround(1 / 3)));
    expect(outlierDelta(2049, 0)).toBe(2048);  // f16 ties to even
    const random = new Random(3100);
    for (const axis of ['channel', 'token'] as const) {
      for (const bits of BITS) {
        const channels = 64, group = 32, tokens = 64;
        const x = random.tensor(tokens * channels);
        for (let i = 0; i < x.length; i += 37) x[i] *= 40;
        const outliers = axis === 'channel' ? 20 : 3;
        const q = referenceQuantize({ x, channels, axis, bits, group, outliers });
        const recordSize = axis === 'channel' ? group * channels : channels;
        const xHat = referenceDequantize(q);
        const full = referenceReconstruct(q);
        expect(q.outlierIndices).toHaveLength((tokens * channels / recordSize) * outliers);
        for (let r = 0; r < tokens * channels / recordSize; r++) {
          const record = x.subarray(r * recordSize, (r + 1) * recordSize);
          const indices = Array.from(q.outlierIndices!.subarray(r * outliers, (r + 1) * outliers));
          expect(indices, `${axis} ${bits} record ${r}`).toEqual(selectOutliers(record, outliers));
          indices.forEach((i, k) => {
            const at = r * recordSize + i;
            const delta = q.outlierDeltas![r * outliers + k];
            expect(delta).toBe(outlierDelta(x[at], xHat[at]));
            expect(full[at]).toBe(xHat[at] + delta);
            // f16 keeps 11 significant bits.
            expect(Math.abs(full[at] - x[at])).toBeLessThanOrEqual(Math.abs(x[at] - xHat[at]) * 2 ** -11 + 1e-12);
          });
        }
        // Non-outliers read plain x^; every group's range leaves its outliers out.
        let changed = 0;
        for (let i = 0; i < x.length; i++) if (full[i] !== xHat[i]) changed++;
        expect(changed).toBeLessThanOrEqual(q.outlierIndices!.length);
        const plain = referenceQuantize({ x, channels, axis, bits, group });
        let narrower = 0;
        for (let g = 0; g < q.scales.length; g++) {
          expect(q.scales[g]).toBeLessThanOrEqual(plain.scales[g]);
          if (q.scales[g] < plain.scales[g]) narrower++;
        }
        expect(narrower, `${axis} ${bits}`).toBeGreaterThan(0);
      }
    }
  });

  it('codes of a record with outliers use the range of its other entries (channel axis, by hand)', () => {
    // One key group of 16 tokens x 16 channels, 2 outliers: both in channel 5.
    const channels = 16, group = 16;
    const x = new Float32Array(group * channels);
    for (let i = 0; i < x.length; i++) x[i] = ((i * 7) % 11) / 10 - 0.5;
    x[3 * channels + 5] = 50;
    x[9 * channels + 5] = -60;
    const q = referenceQuantize({ x, channels, axis: 'channel', bits: 4, group, outliers: 2 });
    expect(Array.from(q.outlierIndices!)).toEqual([3 * channels + 5, 9 * channels + 5]);
    const rest = Array.from({ length: group }, (_, t) => x[t * channels + 5]).filter((_, t) => t !== 3 && t !== 9);
    expect(q.zeros[5]).toBe(f16Round(Math.min(...rest)));
    expect(q.scales[5]).toBe(f16Round(Math.fround(Math.fround(Math.max(...rest) - Math.min(...rest)) / 15)));
    expect(unpackCode(q, 3, 5)).toBe(15);
    expect(unpackCode(q, 9, 5)).toBe(0);
    expect(q.outlierDeltas![0]).toBe(f16Round(Math.fround(50 - dequantizeCode(15, q.scales[5], q.zeros[5]))));
    // The other channels are quantized exactly as without outliers.
    const plain = referenceQuantize({ x, channels, axis: 'channel', bits: 4, group });
    for (let c = 0; c < channels; c++) if (c !== 5) expect([q.scales[c], q.zeros[c]]).toEqual([plain.scales[c], plain.zeros[c]]);
  });
});
