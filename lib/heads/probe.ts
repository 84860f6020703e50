// The built-in retrieval-head probe (methods/duoattention.md, "Retrieval score (Wu et al.)"): a
// random segment of tokens followed by the same segment again. In the second copy a retrieval
// (copy-paste) head at the segment's i-th token attends to the first copy's (i + 1)-th token,
// the token it is about to repeat; scoreHeads(..., { copySegment: length }) counts exactly that.
import { describe } from '../errors.js';
import { knownKeys, optionError, plainObject, positiveInteger } from '../validate.js';
import { mulberry32 } from '../random.js';

/** Options of {@link headProbe}. */
export interface HeadProbeOptions {
  /**
   * Tokens in the random segment L; the probe holds it twice. Default 640: with scoreHeads'
   * default sink 64 and window 256 the copied token is 639 back, past sink + window, and the probe
   * is 4 (sink + window) long (methods/duoattention.md: T >= 4(S+W)).
   */
  length?: number;
  /** Vocabulary size: ids are drawn from `[firstId, vocab)`. */
  vocab: number;
  /** Smallest id drawn (default 0); set it past the tokenizer's special tokens. */
  firstId?: number;
  /** Seed of the generator (default 1): the same options give the same probe. */
  seed?: number;
  /** A token to put first (e.g. the tokenizer's BOS id); not part of either copy. */
  bos?: number;
}


const probeKeys = ['length', 'vocab', 'firstId', 'seed', 'bos'] as const;
/** headProbe's default segment: 2 (64 + 256), twice scoreHeads' default sink + window. */
export const DEFAULT_PROBE_LENGTH = 640;
const MAX_ID = 2 ** 31 - 1;

function tokenId(name: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > MAX_ID) {
    throw optionError(`Expected a token id (an integer in [0, 2^31 - 1]) for ${name} but received ${describe(value)}`);
  }
  return value;
}

/**
 * Token ids of a copy probe: `[bos?] s_0 .. s_{L-1} s_0 .. s_{L-1}` with `s` drawn uniformly from
 * `[firstId, vocab)` by a seeded generator, all distinct when the range holds at least `2 * L`
 * ids (so each copy target is unambiguous), independently otherwise.
 *
 * To classify a model's heads: run these ids through the model as one prompt, record every
 * layer's Q/K/V (post-RoPE, as the cache would hold them; e.g. `writeTrace`, or the trace
 * recording in `examples/`), and pass them to `scoreHeads(trace, { copySegment: length })`. The
 * probe must be the end of the recorded prompt (anything before it, such as a chat template, is
 * allowed) and its last `probes` queries are the ones scored. Choose `length` larger than the
 * streaming `sink + window` you will deploy: the copied token lies `length - 1` positions back, and
 * a copy inside the window is one a streaming head can also make.
 * @returns `2 * length` ids, `2 * length + 1` with `bos`.
 */
export function headProbe(options: HeadProbeOptions): Int32Array {
  const o = plainObject('headProbe options', options);
  knownKeys('headProbe', o, probeKeys);
  const length = o.length === undefined ? DEFAULT_PROBE_LENGTH : positiveInteger('length', o.length, 2 ** 24);
  if (o.vocab === undefined) throw optionError('headProbe: vocab is required (the model\'s vocabulary size)');
  const vocab = positiveInteger('vocab', o.vocab);
  const firstId = o.firstId === undefined ? 0 : tokenId('firstId', o.firstId);
  if (firstId >= vocab) throw optionError(`Expected firstId (${firstId}) to be smaller than vocab (${vocab})`);
  const seed = o.seed === undefined ? 1 : o.seed;
  if (typeof seed !== 'number' || !Number.isInteger(seed) || seed < 0 || seed > 2 ** 32 - 1) {
    throw optionError(`Expected an integer in [0, 2^32 - 1] for seed but received ${describe(seed)}`);
  }
  const bos = o.bos === undefined ? undefined : tokenId('bos', o.bos);

  const uniform = mulberry32(seed);
  const range = vocab - firstId;
  const distinct = range >= 2 * length;
  const seen = new Set<number>();
  const segment = new Int32Array(length);
  for (let i = 0; i < length; i++) {
    let id: number;
    do id = firstId + Math.floor(uniform() * range);
    while (distinct && seen.has(id));
    if (distinct) seen.add(id);
    segment[i] = id;
  }
  const offset = bos === undefined ? 0 : 1;
  const tokens = new Int32Array(offset + 2 * length);
  if (bos !== undefined) tokens[0] = bos;
  tokens.set(segment, offset);
  tokens.set(segment, offset + length);
  return tokens;
}
