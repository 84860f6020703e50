// The encoders in half.ts decide what "the rounded value" means in every dtype test, so they are
// checked here against IEEE 754 facts, exhaustively over all 2^16 bit patterns.
import { describe, expect, it } from 'vitest';

import { bf16BitsToNumber, f16BitsToNumber, f32ToBf16Bits, f32ToF16Bits } from './half.js';

describe('f16 encoder and decoder', () => {
  it('known values', () => {
    expect(f32ToF16Bits(1)).toBe(0x3c00);
    expect(f32ToF16Bits(-2)).toBe(0xc000);
    expect(f32ToF16Bits(65504)).toBe(0x7bff);                 // largest finite
    expect(f32ToF16Bits(65519)).toBe(0x7bff);                 // below the halfway point to 65536
    expect(f32ToF16Bits(65520)).toBe(0x7c00);                 // halfway, ties to even: Inf
    expect(f32ToF16Bits(1e6)).toBe(0x7c00);
    expect(f32ToF16Bits(-Infinity)).toBe(0xfc00);
    expect(f32ToF16Bits(2 ** -14)).toBe(0x0400);              // smallest normal
    expect(f32ToF16Bits(2 ** -24)).toBe(0x0001);              // smallest subnormal
    expect(f32ToF16Bits(2 ** -25)).toBe(0x0000);              // halfway to it: ties to even (0)
    expect(f32ToF16Bits(1.5 * 2 ** -25)).toBe(0x0001);
    expect(f32ToF16Bits(3 * 2 ** -25)).toBe(0x0002);          // 1.5 subnormal ulps: ties to even (2)
    expect(f32ToF16Bits(-0)).toBe(0x8000);
    expect(f32ToF16Bits(1 + 2 ** -11)).toBe(0x3c00);          // halfway between 1 and next: even
    expect(f32ToF16Bits(1 + 3 * 2 ** -11)).toBe(0x3c02);      // halfway between odd and even: even
    expect(f32ToF16Bits(1 + 2 ** -11 + 2 ** -20)).toBe(0x3c01);
    expect(Number.isNaN(f16BitsToNumber(f32ToF16Bits(NaN)))).toBe(true);
    expect(f16BitsToNumber(0x7bff)).toBe(65504);
    expect(f16BitsToNumber(0x0001)).toBe(2 ** -24);
    expect(f16BitsToNumber(0x3555)).toBeCloseTo(1 / 3, 3);
  });

  it('every finite value round-trips, and midpoints round to the even neighbour', () => {
    for (let bits = 0; bits < 0x7c00; bits++) {
      for (const sign of [0, 0x8000]) {
        const value = f16BitsToNumber(bits | sign);
        expect(f32ToF16Bits(value)).toBe(bits | sign);
        if (bits < 0x7bff) {
          const next = f16BitsToNumber((bits + 1) | sign);
          const even = (bits & 1) === 0 ? bits : bits + 1;
          expect(f32ToF16Bits((value + next) / 2)).toBe(even | sign);
        }
      }
    }
  });
});

describe('bf16 encoder and decoder', () => {
  it('known values', () => {
    expect(f32ToBf16Bits(1)).toBe(0x3f80);
    expect(f32ToBf16Bits(-2)).toBe(0xc000);
    expect(f32ToBf16Bits(1e6)).toBe(0x4974);                  // 999424 is the nearest bf16
    expect(bf16BitsToNumber(0x4974)).toBe(999424);
    expect(f32ToBf16Bits(3.4028234663852886e38)).toBe(0x7f80); // f32 max rounds up to Inf
    expect(f32ToBf16Bits(1 + 2 ** -8)).toBe(0x3f80);          // halfway: even
    expect(f32ToBf16Bits(1 + 3 * 2 ** -8)).toBe(0x3f82);
    expect(Number.isNaN(bf16BitsToNumber(f32ToBf16Bits(NaN)))).toBe(true);
  });

  it('every finite value round-trips, and midpoints round to the even neighbour', () => {
    for (let bits = 0; bits < 0x7f80; bits++) {
      for (const sign of [0, 0x8000]) {
        const value = bf16BitsToNumber(bits | sign);
        expect(f32ToBf16Bits(value)).toBe(bits | sign);
        if (bits < 0x7f7f) {
          const midpoint = (value + bf16BitsToNumber((bits + 1) | sign)) / 2; // exact in float32
          const even = (bits & 1) === 0 ? bits : bits + 1;
          expect(f32ToBf16Bits(midpoint)).toBe(even | sign);
        }
      }
    }
  });
});
