/** Error codes of {@link KVSlimError}. */
export type KVSlimErrorCode =
  | 'ERR_SHAPE'
  | 'ERR_DTYPE'
  | 'ERR_OPTION'
  | 'ERR_VALUE'
  | 'ERR_DISPOSED'
  | 'ERR_BUSY'
  | 'ERR_BACKEND_UNAVAILABLE'
  | 'ERR_CORRUPT'
  | 'ERR_OUT_OF_MEMORY'
  | 'ERR_ADDON_LOAD'
  | 'ERR_INTERNAL';

/**
 * Every error kvslim raises on bad input or an unusable backend. `code` is stable; the message
 * names the argument, what was expected and what was received.
 */
export class KVSlimError extends Error {
  readonly code: KVSlimErrorCode;

  constructor(code: KVSlimErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'KVSlimError';
    this.code = code;
  }
}

/** Describes a received value for messages: `-1 of type number`, `Int8Array(3)`. */
export function describe(value: unknown): string {
  if (value === null) return 'null';
  if (ArrayBuffer.isView(value)) {
    const length = 'length' in value ? (value as { length: number }).length : value.byteLength;
    return `${value.constructor.name}(${length})`;
  }
  if (typeof value === 'string') return `'${value}' of type string`;
  if (typeof value === 'object') return `an object of type ${value.constructor?.name ?? 'Object'}`;
  return `${String(value)} of type ${typeof value}`;
}
