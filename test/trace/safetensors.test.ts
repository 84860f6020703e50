// The safetensors writer and strict reader (lib/trace/safetensors.ts): bit-exact round trips of
// every dtype, then hostile input: truncated, garbled and hand-crafted headers must all throw
// ERR_CORRUPT (never another error, never a read outside the buffer).
import { describe, expect, it } from 'vitest';

// The format code needs no addon: import the error class alone so these tests run without a build.
import { KVSlimError } from '../../lib/errors.js';
import { readSafetensors, type SafetensorsTensor, writeSafetensors } from '../../lib/trace/safetensors.js';
import { mulberry32 } from '../helpers/random.js';

function bytesOf(data: ArrayBufferView): Uint8Array {
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

/** Matches a KVSlimError with this code (for toThrow). */
const failsWith = (code: string) => expect.objectContaining({ name: 'KVSlimError', code });

/** A file from a header (an object, raw text or raw bytes) and a data section. */
function craft(header: unknown, data: Uint8Array = new Uint8Array(), headerLength?: bigint): Buffer {
  const json = header instanceof Uint8Array ? Buffer.from(header) : Buffer.from(typeof header === 'string' ? header : JSON.stringify(header), 'utf8');
  const file = Buffer.alloc(8 + json.length + data.length);
  file.writeBigUInt64LE(headerLength ?? BigInt(json.length), 0);
  json.copy(file, 8);
  file.set(data, 8 + json.length);
  return file;
}

/** Float32 specials by bit pattern: -0, infinities, a quiet NaN with a payload, subnormals. */
const specialFloats = new Float32Array(new Uint32Array([0x80000000, 0x7f800000, 0xff800000, 0x7fc01234, 0x00000001, 0x807fffff, 0x3f800000]).buffer);

const everyDtype: Record<string, SafetensorsTensor> = {
  'layers.0.q': { dtype: 'F32', shape: [7], data: specialFloats },
  f64: { dtype: 'F64', shape: [2, 2], data: new Float64Array([Math.PI, -0, Number.MIN_VALUE, -Infinity]) },
  f16: { dtype: 'F16', shape: [3], data: new Uint16Array([0x3c00, 0x7e01, 0x8001]) },
  bf16: { dtype: 'BF16', shape: [1, 3], data: new Uint16Array([0x3f80, 0x7fc1, 0xff80]) },
  i64: { dtype: 'I64', shape: [2], data: new BigInt64Array([-(2n ** 63n), 2n ** 63n - 1n]) },
  u64: { dtype: 'U64', shape: [1], data: new BigUint64Array([2n ** 64n - 1n]) },
  i32: { dtype: 'I32', shape: [2], data: new Int32Array([-(2 ** 31), 2 ** 31 - 1]) },
  u32: { dtype: 'U32', shape: [1], data: new Uint32Array([2 ** 32 - 1]) },
  i16: { dtype: 'I16', shape: [1], data: new Int16Array([-32768]) },
  u16: { dtype: 'U16', shape: [1], data: new Uint16Array([65535]) },
  i8: { dtype: 'I8', shape: [3], data: new Int8Array([-128, 0, 127]) },
  u8: { dtype: 'U8', shape: [2, 1], data: new Uint8Array([0, 255]) },
  bool: { dtype: 'BOOL', shape: [3], data: new Uint8Array([1, 0, 1]) },
  scalar: { dtype: 'F32', shape: [], data: new Float32Array([42]) },
  empty: { dtype: 'F32', shape: [0, 4], data: new Float32Array(0) },
};

describe('safetensors writer and reader', () => {
  it('round-trips every dtype bit-exactly, with metadata', () => {
    const metadata = { format: 'kvslim-trace/1', note: 'ünïcode ✓ "quoted"', empty: '' };
    const file = writeSafetensors(everyDtype, metadata);
    const { tensors, metadata: read } = readSafetensors(file);
    expect({ ...read }).toEqual(metadata);
    expect(Object.keys(tensors).sort()).toEqual(Object.keys(everyDtype).sort());
    for (const [name, tensor] of Object.entries(everyDtype)) {
      const back = tensors[name];
      expect(back.dtype, name).toBe(tensor.dtype);
      expect(back.shape, name).toEqual(tensor.shape);
      expect(back.data.constructor, name).toBe(tensor.data.constructor);
      expect(Buffer.from(bytesOf(back.data)).equals(Buffer.from(bytesOf(tensor.data))), name).toBe(true);
    }
  });

  it('writes the reference layout: 8-byte padded header, each tensor aligned to its element size', () => {
    const file = writeSafetensors(everyDtype);
    const headerLength = Number(file.readBigUInt64LE(0));
    expect(headerLength % 8).toBe(0);
    const header = JSON.parse(file.subarray(8, 8 + headerLength).toString('utf8')) as Record<string, { dtype: string; data_offsets: [number, number] }>;
    expect(header.__metadata__).toBeUndefined();
    const sizes: Record<string, number> = { F64: 8, I64: 8, U64: 8, F32: 4, I32: 4, U32: 4, F16: 2, BF16: 2, I16: 2, U16: 2, I8: 1, U8: 1, BOOL: 1 };
    for (const { dtype, data_offsets: [begin] } of Object.values(header)) expect(begin % sizes[dtype]).toBe(0);
  });

  it('infers the dtype of unambiguous arrays and reads from an unaligned view', () => {
    const file = writeSafetensors({ x: { shape: [2], data: new Float32Array([1.5, -2]) }, b: { shape: [1], data: Buffer.from([7]) } });
    const shifted = new Uint8Array(file.length + 3);
    shifted.set(file, 3);
    const { tensors } = readSafetensors(shifted.subarray(3));
    expect(tensors.x).toEqual({ dtype: 'F32', shape: [2], data: new Float32Array([1.5, -2]) });
    expect(tensors.b.dtype).toBe('U8');
  });

  it('rejects inconsistent tensors when writing', () => {
    expect(() => writeSafetensors({ x: { shape: [3], data: new Float32Array(2) } })).toThrow(failsWith('ERR_SHAPE'));
    expect(() => writeSafetensors({ x: { shape: [-1], data: new Float32Array(0) } })).toThrow(failsWith('ERR_SHAPE'));
    // Negative dimensions whose product is the element count are refused too.
    expect(() => writeSafetensors({ x: { shape: [-2, -2], data: new Float32Array(4) } })).toThrow(failsWith('ERR_SHAPE'));
    expect(() => writeSafetensors({ x: { dtype: 'F16', shape: [1], data: new Float32Array(1) } })).toThrow(failsWith('ERR_DTYPE'));
    expect(() => writeSafetensors({ x: { shape: [1], data: new Uint16Array(1) } })).toThrow(failsWith('ERR_DTYPE'));
    expect(() => writeSafetensors({ x: { dtype: 'constructor' as 'F32', shape: [1], data: new Float32Array(1) } })).toThrow(failsWith('ERR_DTYPE'));
    expect(() => writeSafetensors({ __metadata__: { shape: [1], data: new Float32Array(1) } })).toThrow(failsWith('ERR_OPTION'));
    expect(() => writeSafetensors({}, { n: 3 as unknown as string })).toThrow(failsWith('ERR_OPTION'));
    expect(() => writeSafetensors({ b: { dtype: 'BOOL', shape: [1], data: new Uint8Array([2]) } })).toThrow(failsWith('ERR_VALUE'));
  });

  it('handles an empty file (no tensors) and a tensor named __proto__ without touching prototypes', () => {
    expect(Object.keys(readSafetensors(writeSafetensors({})).tensors)).toEqual([]);
    // Raw text: an object literal with a __proto__ key would set the prototype instead.
    const hostile = craft('{"__proto__":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', new Uint8Array([9]));
    const { tensors } = readSafetensors(hostile);
    expect(Object.getPrototypeOf(tensors)).toBe(null);
    expect(tensors.__proto__).toEqual({ dtype: 'U8', shape: [1], data: new Uint8Array([9]) });
    expect(({} as Record<string, unknown>).dtype).toBeUndefined();
    const written = readSafetensors(writeSafetensors(Object.fromEntries([['__proto__', { shape: [1], data: new Uint8Array([9]) }]])));
    expect(Object.keys(written.tensors)).toEqual(['__proto__']);
  });

  it('rejects input that is not bytes', () => {
    expect(() => readSafetensors('file.safetensors' as unknown as Uint8Array)).toThrow(failsWith('ERR_OPTION'));
  });
});

describe('safetensors reader on hostile files', () => {
  const four = new Uint8Array(16);
  const tensor = (extra: Record<string, unknown> = {}) => ({ dtype: 'F32', shape: [4], data_offsets: [0, 16], ...extra });

  it.each([
    ['fewer than 8 bytes', Buffer.alloc(5)],
    ['a header length past the end', craft({}, new Uint8Array(), 1000n)],
    ['a header length of 2^64 - 1', craft({}, new Uint8Array(), 2n ** 64n - 1n)],
    // A valid JSON header ({, spaces, }) of 100 MB + 1 byte and nothing after it: only the limit refuses it.
    ['a header length above 100 MB', (() => { const f = Buffer.alloc(8 + 100_000_001, 0x20); f.writeBigUInt64LE(100_000_001n, 0); f[8] = 0x7b; f[f.length - 1] = 0x7d; return f; })()],
    ['an empty header', craft('')],
    ['a header not starting with {', craft(' {}')],
    ['a header that is not UTF-8', craft(Uint8Array.of(0x7b, 0x22, 0xff, 0x22, 0x3a, 0x31, 0x7d)) /* {"\xff":1} */],
    ['a header that is not JSON', craft('{"a":')],
    ['a header that is a JSON array', craft('[]')],
    ['a tensor that is not an object', craft({ x: 3 })],
    ['an unknown dtype', craft({ x: tensor({ dtype: 'F8' }) }, four)],
    ['a dtype that is not a string', craft({ x: tensor({ dtype: 4 }) }, four)],
    ['a negative dimension', craft({ x: tensor({ shape: [-4] }) }, four)],
    ['two negative dimensions whose product is the byte size', craft({ x: tensor({ shape: [-2, -2] }) }, four)],
    ['a fractional dimension', craft({ x: tensor({ shape: [4.5] }) }, four)],
    ['a shape that is not a list', craft({ x: tensor({ shape: '4' }) }, four)],
    ['a shape too large to address', craft({ x: tensor({ shape: [2 ** 30, 2 ** 30, 2 ** 30] }) }, four)],
    ['a shape whose product overflows before a zero', craft({ x: tensor({ shape: [2 ** 26, 2 ** 26, 2 ** 26, 0], data_offsets: [0, 0] }) }, four)],
    ['offsets past the data section', craft({ x: tensor({ data_offsets: [0, 32], shape: [8] }) }, four)],
    ['offsets beyond any file', craft({ x: tensor({ data_offsets: [2 ** 52, 2 ** 52 + 16] }) }, four)],
    ['begin after end', craft({ x: tensor({ data_offsets: [16, 0] }) }, four)],
    ['three offsets', craft({ x: tensor({ data_offsets: [0, 8, 16] }) }, four)],
    ['negative offsets', craft({ x: tensor({ data_offsets: [-16, 0] }) }, four)],
    ['fractional offsets', craft({ x: tensor({ data_offsets: [0.5, 16.5] }) }, four)],
    ['a byte size that disagrees with dtype and shape', craft({ x: tensor({ dtype: 'F64' }) }, four)],
    ['overlapping tensors', craft({ x: tensor({ shape: [3], data_offsets: [0, 12] }), y: tensor({ shape: [2], data_offsets: [8, 16] }) }, four)],
    ['two tensors on the same bytes', craft({ x: tensor(), y: tensor() }, four)],
    ['a gap between tensors', craft({ x: tensor({ shape: [1], data_offsets: [0, 4] }), y: tensor({ shape: [2], data_offsets: [8, 16] }) }, four)],
    ['bytes after the last tensor', craft({ x: tensor({ shape: [3], data_offsets: [0, 12] }) }, four)],
    ['data but no tensors', craft({}, four)],
    ['metadata that is not an object', craft({ __metadata__: 'x' })],
    ['metadata with a non-string value', craft({ __metadata__: { n: 3 } })],
    ['an unknown tensor field', craft({ x: tensor({ offsets: [0, 16] }) }, four)],
    ['a BOOL other than 0 or 1', craft({ b: { dtype: 'BOOL', shape: [1], data_offsets: [0, 1] } }, new Uint8Array([2]))],
  ])('rejects %s with ERR_CORRUPT', (_name, file) => {
    expect(() => readSafetensors(file)).toThrow(expect.objectContaining({
      name: 'KVSlimError', code: 'ERR_CORRUPT', message: expect.stringMatching(/^Invalid safetensors file: /),
    }));
  });

  const valid = writeSafetensors(
    {
      'layers.0.q': { shape: [3, 2, 4], data: new Float32Array(24).map((_, i) => i * 0.5 - 3) },
      'layers.0.k': { shape: [3, 1, 4], data: new Float32Array(12).map((_, i) => -i) },
      ids: { shape: [3], data: new Int32Array([1, 403, 407]) },
    },
    { format: 'kvslim-trace/1', tokens: '[1,403,407]' },
  );

  /** Reading either succeeds with in-bounds tensors or throws ERR_CORRUPT; nothing else. */
  function readOrCorrupt(file: Uint8Array): boolean {
    try {
      const { tensors } = readSafetensors(file);
      for (const t of Object.values(tensors)) expect(t.data.length).toBe(t.shape.reduce((a, b) => a * b, 1));
      return true;
    } catch (error) {
      expect(error).toBeInstanceOf(KVSlimError);
      expect((error as KVSlimError).code).toBe('ERR_CORRUPT');
      return false;
    }
  }

  it('rejects every truncation of a valid file', () => {
    for (let length = 0; length < valid.length; length++) {
      expect(readOrCorrupt(valid.subarray(0, length)), `truncated to ${length}`).toBe(false);
    }
    expect(readOrCorrupt(valid)).toBe(true);
  });

  it('survives random byte corruption (fuzz, seeded)', () => {
    const random = mulberry32(2024);
    let accepted = 0;
    for (let round = 0; round < 3000; round++) {
      const file = Buffer.from(valid);
      const flips = 1 + Math.floor(random() * 4);
      for (let f = 0; f < flips; f++) {
        // Aim most flips at the header, where the structure is.
        const headerEnd = 8 + Number(valid.readBigUInt64LE(0));
        const at = random() < 0.8 ? Math.floor(random() * headerEnd) : Math.floor(random() * file.length);
        file[at] = random() < 0.5 ? Math.floor(random() * 256) : file[at] ^ (1 << Math.floor(random() * 8));
      }
      if (readOrCorrupt(file)) accepted++;
    }
    // Flips inside the data or the padding are legal files; most header flips are not.
    expect(accepted).toBeGreaterThan(0);
    expect(accepted).toBeLessThan(3000);
  });

  it('survives garbage and random header lengths (fuzz, seeded)', () => {
    const random = mulberry32(7);
    for (let round = 0; round < 2000; round++) {
      const garbage = new Uint8Array(Math.floor(random() * 200)).map(() => Math.floor(random() * 256));
      readOrCorrupt(garbage);
      const relength = Buffer.from(valid);
      relength.writeBigUInt64LE(BigInt(Math.floor(random() * valid.length * 2)), 0);
      readOrCorrupt(relength);
    }
  });
});
