// The safetensors file format (huggingface/safetensors): an 8-byte little-endian header length N,
// N bytes of UTF-8 JSON, then the data section. The header maps each tensor name to
// `{ dtype, shape, data_offsets: [begin, end] }` (offsets into the data section) and may hold a
// `__metadata__` object of string values. Tensors are little-endian and row-major.
//
// The reader trusts nothing in the file: every length, offset and count is checked against the
// buffer before a byte is copied, and it applies the reference implementation's rules (tensors
// cover the data section exactly, no gaps, no overlaps, no trailing bytes).
import { describe, KVSlimError } from '../errors.js';

/** Element types of the safetensors format that kvslim reads and writes. */
export type SafetensorsDtype = 'F64' | 'F32' | 'F16' | 'BF16' | 'I64' | 'I32' | 'I16' | 'I8' | 'U64' | 'U32' | 'U16' | 'U8' | 'BOOL';

/** Elements of a tensor: F16, BF16 and U16 travel as Uint16Array bits; BOOL as Uint8Array (0 or 1). */
export type SafetensorsData =
  | Float64Array | Float32Array | Uint16Array | BigInt64Array | Int32Array | Int16Array | Int8Array
  | BigUint64Array | Uint32Array | Uint8Array;

/** One tensor: its element type, shape (row-major) and elements (`data.length` = product of `shape`). */
export interface SafetensorsTensor {
  dtype: SafetensorsDtype;
  shape: number[];
  data: SafetensorsData;
}

/** What {@link readSafetensors} returns. Both records have no prototype (names come from the file). */
export interface SafetensorsFile {
  /** Tensors by name, in the header's order. */
  tensors: Record<string, SafetensorsTensor>;
  /** The header's `__metadata__` (string values only); empty when absent. */
  metadata: Record<string, string>;
}

type ArrayClass = { new (length: number): SafetensorsData; readonly BYTES_PER_ELEMENT: number };

const arrayOf: Record<SafetensorsDtype, ArrayClass> = {
  F64: Float64Array, F32: Float32Array, F16: Uint16Array, BF16: Uint16Array,
  I64: BigInt64Array, I32: Int32Array, I16: Int16Array, I8: Int8Array,
  U64: BigUint64Array, U32: Uint32Array, U16: Uint16Array, U8: Uint8Array, BOOL: Uint8Array,
};

/** The dtype a typed array stands for when the caller names none; Uint16Array is ambiguous. */
const impliedDtypes: Array<[ArrayClass, SafetensorsDtype]> = [
  [Float64Array, 'F64'], [Float32Array, 'F32'], [BigInt64Array, 'I64'], [Int32Array, 'I32'],
  [Int16Array, 'I16'], [Int8Array, 'I8'], [BigUint64Array, 'U64'], [Uint32Array, 'U32'], [Uint8Array, 'U8'],
];

/** The reference implementation's limit: a header this large is an attack, not a model. */
const MAX_HEADER_BYTES = 100_000_000;

const HOST_IS_LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** Swaps each element's bytes in place on a big-endian host (the file is little-endian); else a no-op. */
function littleEndianInPlace(bytes: Uint8Array, elementBytes: number): void {
  if (HOST_IS_LITTLE_ENDIAN || elementBytes === 1) return;
  for (let start = 0; start < bytes.length; start += elementBytes) bytes.subarray(start, start + elementBytes).reverse();
}

/**
 * Encodes tensors and string metadata as a safetensors file. A tensor's dtype may be omitted when
 * its array type names one (Float32Array: F32, ...); Uint16Array needs `F16`, `BF16` or `U16`.
 * Tensors are laid out by element size, largest first, so every tensor starts aligned to its
 * element size; the header is padded with spaces to a multiple of 8 bytes.
 * Throws `ERR_OPTION`, `ERR_DTYPE`, `ERR_SHAPE` or `ERR_VALUE` (naming the tensor) on inconsistent input.
 */
export function writeSafetensors(
  tensors: Record<string, { dtype?: SafetensorsDtype; shape: readonly number[]; data: SafetensorsData }>,
  metadata: Record<string, string> = {},
): Buffer {
  if (typeof tensors !== 'object' || tensors === null) {
    throw new KVSlimError('ERR_OPTION', `Expected an object of tensors but received ${describe(tensors)}`);
  }
  // No prototype: a tensor named __proto__ must become a key, not replace the prototype.
  const header: Record<string, unknown> = Object.create(null);
  if (typeof metadata !== 'object' || metadata === null || Array.isArray(metadata)) {
    throw new KVSlimError('ERR_OPTION', `Expected an object of strings for metadata but received ${describe(metadata)}`);
  }
  for (const [key, value] of Object.entries(metadata)) {
    if (typeof value !== 'string') {
      throw new KVSlimError('ERR_OPTION', `Expected a string for metadata.${key} but received ${describe(value)}`);
    }
  }
  if (Object.keys(metadata).length > 0) header.__metadata__ = { ...metadata };

  const entries = Object.entries(tensors).map(([name, tensor]) => {
    if (name === '__metadata__' || name === '') {
      throw new KVSlimError('ERR_OPTION', `Expected a tensor name other than '${name}'`);
    }
    const { data, shape } = tensor;
    const dtype = tensor.dtype ?? impliedDtypes.find(([ArrayType]) => data instanceof ArrayType)?.[1];
    if (dtype === undefined || !Object.hasOwn(arrayOf, dtype)) {
      throw new KVSlimError(
        'ERR_DTYPE',
        `Expected a safetensors dtype for tensor '${name}' (Uint16Array needs 'F16', 'BF16' or 'U16') but received ${describe(tensor.dtype ?? data)}`,
      );
    }
    if (!(data instanceof arrayOf[dtype])) {
      throw new KVSlimError('ERR_DTYPE', `Expected a ${arrayOf[dtype].name} for ${dtype} tensor '${name}' but received ${describe(data)}`);
    }
    if (!Array.isArray(shape) || !shape.every((dim) => Number.isSafeInteger(dim) && dim >= 0)) {
      throw new KVSlimError('ERR_SHAPE', `Expected an array of non-negative integers for the shape of '${name}' but received ${describe(shape)}`);
    }
    const count = shape.reduce((product, dim) => product * dim, 1);
    if (count !== data.length) {
      throw new KVSlimError(
        'ERR_SHAPE', `Expected tensor '${name}' of shape [${shape.join(', ')}] to hold ${count} elements but received ${data.length}`,
      );
    }
    if (dtype === 'BOOL' && (data as Uint8Array).some((value) => value > 1)) {
      throw new KVSlimError('ERR_VALUE', `Expected only 0 and 1 in BOOL tensor '${name}'`);
    }
    return { name, dtype, shape: [...shape], data };
  });
  // Stable: equal element sizes keep the caller's order.
  entries.sort((a, b) => b.data.BYTES_PER_ELEMENT - a.data.BYTES_PER_ELEMENT);

  let offset = 0;
  for (const entry of entries) {
    header[entry.name] = { dtype: entry.dtype, shape: entry.shape, data_offsets: [offset, offset + entry.data.byteLength] };
    offset += entry.data.byteLength;
  }
  let json = Buffer.from(JSON.stringify(header), 'utf8');
  if (json.length % 8 !== 0) json = Buffer.concat([json, Buffer.alloc(8 - (json.length % 8), 0x20)]);

  const file = Buffer.alloc(8 + json.length + offset);
  file.writeBigUInt64LE(BigInt(json.length), 0);
  json.copy(file, 8);
  let at = 8 + json.length;
  for (const { data } of entries) {
    const target = file.subarray(at, at + data.byteLength);
    target.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
    littleEndianInPlace(target, data.BYTES_PER_ELEMENT);
    at += data.byteLength;
  }
  return file;
}

function corrupt(message: string): KVSlimError {
  return new KVSlimError('ERR_CORRUPT', `Invalid safetensors file: ${message}`);
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/**
 * Decodes a safetensors file. Tensor elements are copied into fresh (aligned) typed arrays, so the
 * result does not keep `bytes` alive. Anything malformed throws `ERR_CORRUPT` naming the problem:
 * a header length beyond the file or over 100 MB, a header that is not a UTF-8 JSON object,
 * unknown dtypes, shapes whose byte size disagrees with their offsets, offsets outside the data
 * section, overlapping tensors, gaps, or trailing bytes.
 */
export function readSafetensors(bytes: Uint8Array): SafetensorsFile {
  if (!(bytes instanceof Uint8Array)) {
    throw new KVSlimError('ERR_OPTION', `Expected a Buffer or Uint8Array for readSafetensors but received ${describe(bytes)}`);
  }
  if (bytes.length < 8) throw corrupt(`${bytes.length} bytes is too short for the 8-byte header length`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const declared = view.getBigUint64(0, true);
  if (declared > BigInt(bytes.length - 8)) {
    throw corrupt(`the header length ${declared} exceeds the ${bytes.length - 8} bytes after it`);
  }
  if (declared > BigInt(MAX_HEADER_BYTES)) throw corrupt(`the header length ${declared} exceeds ${MAX_HEADER_BYTES}`);
  const headerBytes = Number(declared);
  if (headerBytes < 2 || bytes[8] !== 0x7b) throw corrupt(`the header does not start with '{'`);

  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(bytes.subarray(8, 8 + headerBytes));
  } catch {
    throw corrupt('the header is not valid UTF-8');
  }
  let header: unknown;
  try {
    header = JSON.parse(text);
  } catch (error) {
    throw corrupt(`the header is not valid JSON (${(error as Error).message})`);
  }
  // Valid JSON that starts with '{' is an object.
  const entries = Object.entries(header as Record<string, unknown>);

  const metadata: Record<string, string> = Object.create(null);
  const layout: Array<{ name: string; dtype: SafetensorsDtype; shape: number[]; begin: number; end: number }> = [];
  const dataStart = 8 + headerBytes;
  const dataBytes = bytes.length - dataStart;

  for (const [name, entry] of entries) {
    if (name === '__metadata__') {
      if (!isRecord(entry)) throw corrupt('__metadata__ is not an object');
      for (const [key, value] of Object.entries(entry)) {
        if (typeof value !== 'string') throw corrupt(`__metadata__.${key} is not a string`);
        metadata[key] = value;
      }
      continue;
    }
    if (!isRecord(entry)) throw corrupt(`tensor '${name}' is not an object`);
    for (const key of Object.keys(entry)) {
      if (key !== 'dtype' && key !== 'shape' && key !== 'data_offsets') throw corrupt(`tensor '${name}' has an unknown field '${key}'`);
    }
    const { dtype, shape, data_offsets: offsets } = entry;
    if (typeof dtype !== 'string' || !Object.hasOwn(arrayOf, dtype)) {
      throw corrupt(`tensor '${name}' has an unsupported dtype ${JSON.stringify(dtype)}`);
    }
    if (!Array.isArray(shape) || !shape.every((dim): dim is number => Number.isSafeInteger(dim) && dim >= 0)) {
      throw corrupt(`tensor '${name}' has a shape that is not a list of non-negative integers`);
    }
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every((o): o is number => Number.isSafeInteger(o) && o >= 0)) {
      throw corrupt(`tensor '${name}' has data_offsets that are not two non-negative integers`);
    }
    const [begin, end] = offsets as [number, number];
    if (begin > end || end > dataBytes) {
      throw corrupt(`tensor '${name}' has data_offsets [${begin}, ${end}] outside the ${dataBytes}-byte data section`);
    }
    const elementBytes = arrayOf[dtype as SafetensorsDtype].BYTES_PER_ELEMENT;
    let count = 1;
    for (const dim of shape) {
      count *= dim;
      if (count > Number.MAX_SAFE_INTEGER / 8) throw corrupt(`tensor '${name}' has a shape too large to address`);
    }
    if (count * elementBytes !== end - begin) {
      throw corrupt(
        `tensor '${name}' of dtype ${dtype} and shape [${shape.join(', ')}] needs ${count * elementBytes} bytes ` +
          `but its data_offsets span ${end - begin}`,
      );
    }
    layout.push({ name, dtype: dtype as SafetensorsDtype, shape, begin, end });
  }

  // Tensors must tile the data section: sorted by offset, each starts where the previous ended.
  const byOffset = [...layout].sort((a, b) => a.begin - b.begin || a.end - b.end);
  let covered = 0;
  for (const tensor of byOffset) {
    if (tensor.begin < covered) throw corrupt(`tensor '${tensor.name}' overlaps the tensor before it (byte ${tensor.begin} < ${covered})`);
    if (tensor.begin > covered) throw corrupt(`bytes ${covered}..${tensor.begin} of the data section belong to no tensor`);
    covered = tensor.end;
  }
  if (covered !== dataBytes) throw corrupt(`the data section has ${dataBytes - covered} trailing bytes that belong to no tensor`);

  const tensors: Record<string, SafetensorsTensor> = Object.create(null);
  for (const { name, dtype, shape, begin, end } of layout) {
    const ArrayType = arrayOf[dtype];
    const data = new ArrayType((end - begin) / ArrayType.BYTES_PER_ELEMENT);
    const target = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    target.set(bytes.subarray(dataStart + begin, dataStart + end));
    littleEndianInPlace(target, ArrayType.BYTES_PER_ELEMENT);
    if (dtype === 'BOOL' && (data as Uint8Array).some((value) => value > 1)) throw corrupt(`BOOL tensor '${name}' holds a value other than 0 or 1`);
    tensors[name] = { dtype, shape, data };
  }
  return { tensors, metadata };
}
