// The llama2.c checkpoint format (karpathy/llama2.c, "legacy" version 0 export): seven int32
// header fields, then float32 weights in a fixed order, all little-endian:
//   dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
//   token_embedding [vocab, dim]
//   rms_att [layers, dim], wq [layers, dim, dim], wk [layers, kvDim, dim], wv [layers, kvDim, dim],
//   wo [layers, dim, dim], rms_ffn [layers, dim], w1 [layers, hidden, dim], w2 [layers, dim, hidden],
//   w3 [layers, hidden, dim], rms_final [dim],
//   freq_cis_real [seq_len, headDim/2], freq_cis_imag [seq_len, headDim/2]   (unused: RoPE is recomputed)
//   wcls [vocab, dim]   only when vocab_size is negative; a positive vocab_size means the classifier
//                       shares the token embedding.
// Matrices are [out, in] row-major: y = W x reads row o of W for output o.
import { readFileSync } from 'node:fs';

import { KVSlimError } from '../../index.js';

/** Shapes of a llama2.c model. */
export interface ModelConfig {
  /** Width of the residual stream. */
  dim: number;
  /** Width of the SwiGLU feed-forward layer. */
  hiddenDim: number;
  layers: number;
  /** Query heads. */
  heads: number;
  /** Key/value heads (GQA when fewer than heads). */
  kvHeads: number;
  vocabSize: number;
  /** Longest sequence the model was trained on (positions 0 .. seqLen-1). */
  seqLen: number;
  /** dim / heads. */
  headDim: number;
  /** True when the output classifier is the token embedding. */
  sharedClassifier: boolean;
}

/** Weight matrices, each a view into one Float32Array; per-layer tensors are stacked along the first axis. */
export interface Weights {
  tokenEmbedding: Float32Array;
  rmsAtt: Float32Array;
  wq: Float32Array;
  wk: Float32Array;
  wv: Float32Array;
  wo: Float32Array;
  rmsFfn: Float32Array;
  w1: Float32Array;
  w2: Float32Array;
  w3: Float32Array;
  rmsFinal: Float32Array;
  /** The classifier `[vocab, dim]`; the token embedding itself when shared. */
  wcls: Float32Array;
}

export interface Checkpoint {
  config: ModelConfig;
  weights: Weights;
}

const HEADER_BYTES = 7 * 4;
/** The magic of llama2.c's versioned exports ("ak42"), which this reader does not handle. */
const VERSIONED_MAGIC = 0x616b3432;

function corrupt(message: string): KVSlimError {
  return new KVSlimError('ERR_CORRUPT', `Invalid llama2.c checkpoint: ${message}`);
}

/**
 * Reads a llama2.c legacy checkpoint from a path or its bytes. Every header field and the exact
 * file size are checked; a mismatch throws `ERR_CORRUPT` saying what was expected.
 */
export function readCheckpoint(source: string | Uint8Array): Checkpoint {
  const bytes = typeof source === 'string' ? readFileSync(source) : source;
  if (bytes.length < HEADER_BYTES) throw corrupt(`${bytes.length} bytes is shorter than the 28-byte header`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (view.getUint32(0, true) === VERSIONED_MAGIC) {
    throw corrupt(`this is a versioned llama2.c export (magic 'ak42'); export it with the legacy format (version 0)`);
  }
  const field = (index: number) => view.getInt32(index * 4, true);
  const [dim, hiddenDim, layers, heads, kvHeads, signedVocab, seqLen] = [0, 1, 2, 3, 4, 5, 6].map(field);
  const names = { dim, hiddenDim, layers, heads, kvHeads, seqLen, vocabSize: Math.abs(signedVocab) };
  for (const [name, value] of Object.entries(names)) {
    if (value < 1) throw corrupt(`header field ${name} is ${value}`);
  }
  if (dim % heads !== 0) throw corrupt(`dim ${dim} is not a multiple of heads ${heads}`);
  if (heads % kvHeads !== 0) throw corrupt(`heads ${heads} is not a multiple of kvHeads ${kvHeads}`);
  const headDim = dim / heads;
  if (headDim % 2 !== 0) throw corrupt(`head size ${headDim} is odd (RoPE rotates pairs)`);
  const config: ModelConfig = {
    dim, hiddenDim, layers, heads, kvHeads, vocabSize: Math.abs(signedVocab), seqLen, headDim,
    sharedClassifier: signedVocab > 0,
  };

  const kvDim = kvHeads * headDim;
  const { vocabSize } = config;
  const sizes: Array<[keyof Weights | 'freqCis', number]> = [
    ['tokenEmbedding', vocabSize * dim],
    ['rmsAtt', layers * dim],
    ['wq', layers * dim * dim],
    ['wk', layers * kvDim * dim],
    ['wv', layers * kvDim * dim],
    ['wo', layers * dim * dim],
    ['rmsFfn', layers * dim],
    ['w1', layers * hiddenDim * dim],
    ['w2', layers * dim * hiddenDim],
    ['w3', layers * hiddenDim * dim],
    ['rmsFinal', dim],
    ['freqCis', seqLen * headDim], // real and imaginary halves, [seqLen, headDim/2] each
  ];
  if (!config.sharedClassifier) sizes.push(['wcls', vocabSize * dim]);
  const floats = sizes.reduce((total, [, size]) => total + size, 0);
  const expectedBytes = HEADER_BYTES + 4 * floats;
  if (bytes.length !== expectedBytes) {
    throw corrupt(
      `a model with ${JSON.stringify(names)} takes ${expectedBytes} bytes but the file has ${bytes.length}`,
    );
  }

  // One aligned copy, decoded little-endian whatever the host's byte order.
  const all = new Float32Array(floats);
  for (let i = 0; i < floats; i++) all[i] = view.getFloat32(HEADER_BYTES + 4 * i, true);
  const weights: Partial<Weights> = {};
  let offset = 0;
  for (const [name, size] of sizes) {
    if (name !== 'freqCis') weights[name] = all.subarray(offset, offset + size);
    offset += size;
  }
  weights.wcls ??= weights.tokenEmbedding;
  return { config, weights: weights as Weights };
}
