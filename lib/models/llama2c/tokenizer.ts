// The llama2.c tokenizer format (tokenizer.bin, exported from a SentencePiece BPE model):
//   int32 max_token_length, then per token id (vocab_size of them, a number the file does not
//   store: it comes from the model): float32 merge score, int32 byte length, the piece's bytes.
// Pieces are raw bytes; SentencePiece's word marker '▁' is already a space. Byte-fallback tokens
// are the literal pieces '<0x00>' .. '<0xFF>'.
//
// Encoding follows llama2.c: a dummy-prefix space, one token per UTF-8 character (bytes
// that have no piece fall back to their byte tokens), then repeatedly merge the adjacent pair
// whose concatenation is the highest-scoring piece (leftmost on ties).
import { readFileSync } from 'node:fs';

import { KVSlimError } from '../../index.js';

/** Id of the beginning-of-sequence token in llama2.c vocabularies. */
export const BOS = 1;
/** Id of the end-of-sequence token. */
export const EOS = 2;

/** Bytes as a string of char codes 0..255: an exact, cheap Map key for byte sequences. */
function byteKey(bytes: Uint8Array): string {
  return String.fromCharCode(...bytes);
}

const encoder = new TextEncoder();

export interface EncodeOptions {
  /** Start with the BOS token (default true: a new sequence). */
  bos?: boolean;
  /** End with the EOS token (default false). */
  eos?: boolean;
  /**
   * Put SentencePiece's dummy-prefix space before the text (default true), so the first word
   * encodes like every later one (' Once'). Off for text that continues a sequence verbatim.
   */
  prefixSpace?: boolean;
}

export class Tokenizer {
  readonly vocabSize: number;
  readonly maxTokenLength: number;
  /** Each id's piece as raw bytes. */
  readonly #pieces: Uint8Array[];
  readonly #scores: Float32Array;
  /** Piece bytes (as a byteKey) to id. */
  readonly #ids = new Map<string, number>();
  /** For '<0xXX>' pieces: the byte they stand for; else -1. */
  readonly #byteValue: Int16Array;

  private constructor(pieces: Uint8Array[], scores: Float32Array, maxTokenLength: number) {
    this.vocabSize = pieces.length;
    this.maxTokenLength = maxTokenLength;
    this.#pieces = pieces;
    this.#scores = scores;
    this.#byteValue = new Int16Array(pieces.length).fill(-1);
    pieces.forEach((piece, id) => {
      const key = byteKey(piece);
      // The first id wins, as in llama2.c's sorted-vocabulary lookup of distinct pieces.
      if (!this.#ids.has(key)) this.#ids.set(key, id);
      const match = /^<0x([0-9A-Fa-f]{2})>$/.exec(key);
      if (match) this.#byteValue[id] = parseInt(match[1], 16);
    });
  }

  /**
   * Reads a llama2.c tokenizer.bin from a path or its bytes; `vocabSize` is the model's (the
   * file does not store it). A file that ends early, has trailing bytes or negative lengths throws
   * `ERR_CORRUPT`.
   */
  static read(source: string | Uint8Array, vocabSize: number): Tokenizer {
    if (!Number.isSafeInteger(vocabSize) || vocabSize < 1) {
      throw new KVSlimError('ERR_OPTION', `Expected a positive integer for vocabSize but received ${String(vocabSize)}`);
    }
    const bytes = typeof source === 'string' ? readFileSync(source) : source;
    const corrupt = (message: string) => new KVSlimError('ERR_CORRUPT', `Invalid llama2.c tokenizer: ${message}`);
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    if (bytes.length < 4) throw corrupt('shorter than its 4-byte header');
    const maxTokenLength = view.getInt32(0, true);
    const pieces: Uint8Array[] = [];
    const scores = new Float32Array(vocabSize);
    let offset = 4;
    for (let id = 0; id < vocabSize; id++) {
      if (offset + 8 > bytes.length) throw corrupt(`ends at token ${id} of ${vocabSize}`);
      scores[id] = view.getFloat32(offset, true);
      const length = view.getInt32(offset + 4, true);
      offset += 8;
      if (length < 0 || offset + length > bytes.length) throw corrupt(`token ${id} has length ${length}, past the end of the file`);
      pieces.push(bytes.slice(offset, offset + length));
      offset += length;
    }
    if (offset !== bytes.length) {
      throw corrupt(`${bytes.length - offset} bytes follow the ${vocabSize} tokens; is vocabSize right?`);
    }
    return new Tokenizer(pieces, scores, maxTokenLength);
  }

  /** Token ids of a text (see {@link EncodeOptions} for BOS, EOS and the dummy-prefix space). */
  encode(text: string, options: EncodeOptions = {}): number[] {
    const { bos = true, eos = false, prefixSpace = true } = options;
    const tokens: number[] = [];
    if (bos) tokens.push(BOS);
    if (text.length > 0 && prefixSpace) tokens.push(this.#idOf(' '));

    // One token per character; characters without a piece become their UTF-8 byte tokens.
    for (const char of text) {
      const utf8 = encoder.encode(char);
      const id = this.#ids.get(byteKey(utf8));
      if (id !== undefined) {
        tokens.push(id);
      } else {
        for (const byte of utf8) tokens.push(this.#byteToken(byte));
      }
    }

    // Merge the best-scoring adjacent pair until no pair forms a piece.
    const start = bos ? 1 : 0;
    for (;;) {
      let bestScore = -Infinity;
      let bestId = -1;
      let bestAt = -1;
      for (let i = start; i < tokens.length - 1; i++) {
        const pair = byteKey(this.#pieces[tokens[i]]) + byteKey(this.#pieces[tokens[i + 1]]);
        const id = this.#ids.get(pair);
        if (id !== undefined && this.#scores[id] > bestScore) {
          bestScore = this.#scores[id];
          bestId = id;
          bestAt = i;
        }
      }
      if (bestId === -1) break;
      tokens.splice(bestAt, 2, bestId);
    }
    if (eos) tokens.push(EOS);
    return tokens;
  }

  /**
   * The bytes one token stands for, given the token before it: byte tokens become their byte,
   * and the space a piece starts with is dropped right after BOS (the dummy prefix).
   * Bytes, not text: one character can span several byte tokens (decode with a streaming
   * TextDecoder, or use {@link decodeText}).
   */
  decode(token: number, previous: number): Uint8Array {
    this.#checkId(token);
    const byte = this.#byteValue[token];
    if (byte >= 0) return Uint8Array.of(byte);
    const piece = this.#pieces[token];
    return previous === BOS && piece[0] === 0x20 ? piece.subarray(1) : piece;
  }

  /** The text of a token sequence (BOS and EOS tokens themselves print nothing). */
  decodeText(tokens: readonly number[], previous = -1): string {
    const decoder = new TextDecoder();
    let text = '';
    for (const token of tokens) {
      if (token !== BOS && token !== EOS) text += decoder.decode(this.decode(token, previous), { stream: true });
      previous = token;
    }
    return text + decoder.decode();
  }

  #idOf(piece: string): number {
    const id = this.#ids.get(byteKey(encoder.encode(piece)));
    if (id === undefined) throw new KVSlimError('ERR_CORRUPT', `Invalid llama2.c tokenizer: it has no piece ${JSON.stringify(piece)}`);
    return id;
  }

  #byteToken(byte: number): number {
    // llama2.c's layout: ids 3..258 are <0x00>..<0xFF>. Look the piece up rather than assume it.
    return this.#idOf(`<0x${byte.toString(16).toUpperCase().padStart(2, '0')}>`);
  }

  #checkId(token: number): void {
    if (!Number.isInteger(token) || token < 0 || token >= this.vocabSize) {
      throw new KVSlimError('ERR_VALUE', `Expected a token id in [0, ${this.vocabSize - 1}] but received ${String(token)}`);
    }
  }
}
