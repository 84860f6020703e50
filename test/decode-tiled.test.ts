// More query rows per kv head than the decode driver takes (17 to 256: a speculative step's
// drafts, a small chunk) go to the tiled decode driver on the CPU (attention_decode_tiled.cc):
// key splits walked in slices of 256 keys converted to f32, every row of the head tiled against
// each slice, the splits merged by log-sum-exp. Each case here is checked against the float64
// reference over what the store holds: rows on both sides of the driver's limits (16 and 256),
// GQA and MHA, head sizes that are not a whole number of vectors, caches of 1 token up to several
// splits, partial slices, every store dtype, attend and step, and one and two threads.
import { describe, expect, it } from 'vitest';

import { KVCache } from '../lib/index.js';
import { expectClose } from './helpers/outputs.js';
import { Random, relativeL2 } from './helpers/random.js';
import { type Heads, LayerMirror, randomTokens } from './helpers/tokens.js';
import { disposedAfterEach } from './helpers/lifetime.js';

// f32 accumulation over up to 5000 keys, as cache.test.ts.
const TOLERANCE = 2e-5;

const DEVICE = process.env.KVSLIM_TEST_DEVICE === 'cuda' ? 'cuda' : 'cpu';

const open = disposedAfterEach<KVCache>();

interface Case {
  name: string;
  heads: Heads;
  store: 'f32' | 'f16' | 'bf16';
  /** Tokens appended before the queries. */
  context: number;
  /** Query tokens n (rows per kv head = n x qHeads / kvHeads). */
  n: number;
  threads?: number;
}

const gqa82 = { qHeads: 8, kvHeads: 2, headDim: 64 };
const gqa81 = { qHeads: 8, kvHeads: 1, headDim: 32 };
const gqa42 = { qHeads: 4, kvHeads: 2, headDim: 128 };

const cases: Case[] = [
  { name: 'GQA 8/2 d64, 4 queries (16 rows: the decode driver) over 700', heads: gqa82, store: 'f16', context: 700, n: 4 },
  { name: 'GQA 8/2 d64, 5 queries (20 rows) over 700', heads: gqa82, store: 'f16', context: 700, n: 5 },
  { name: 'MHA 4/4 d72, 17 rows (one past the decode driver) over 300', heads: { qHeads: 4, kvHeads: 4, headDim: 72 }, store: 'f32', context: 300, n: 17 },
  { name: 'GQA 6/2 d100, a step of 6 queries (18 rows) after 1 token', heads: { qHeads: 6, kvHeads: 2, headDim: 100 }, store: 'bf16', context: 1, n: 6 },
  { name: 'GQA 8/1 d32, 32 queries (256 rows, the limit) over 2600', heads: gqa81, store: 'f16', context: 2600, n: 32 },
  { name: 'GQA 8/1 d32, 33 queries (264 rows: the prefill drivers) over 600', heads: gqa81, store: 'f16', context: 600, n: 33 },
  { name: 'GQA 4/2 d128, 9 queries (18 rows) over 5000 (splits), one thread', heads: gqa42, store: 'f16', context: 5000, n: 9, threads: 1 },
  { name: 'GQA 4/2 d128, 9 queries (18 rows) over 5000 (splits), two threads', heads: gqa42, store: 'f16', context: 5000, n: 9, threads: 2 },
  { name: 'MHA 2/2 d16, 70 rows over 257 (a slice and one key)', heads: { qHeads: 2, kvHeads: 2, headDim: 16 }, store: 'f32', context: 257, n: 70 },
];

function cacheOf(c: Case): KVCache {
  const cache = new KVCache({
    layers: 1, ...c.heads, device: DEVICE, ...(c.threads ? { threads: c.threads } : {}), policy: { store: { kind: c.store } },
  });
  open.push(cache);
  return cache;
}

describe('attention of 17 to 256 rows per kv head against the float64 reference', () => {
  for (const c of cases) {
    it(c.name, () => {
      const random = new Random(c.context * 31 + c.n);
      const cache = cacheOf(c);
      const mirror = new LayerMirror(c.heads, c.store);
      const context = randomTokens(random, c.heads, c.context);
      cache.append(0, context.k, context.v);
      mirror.append(context.k, context.v);

      // attend: n queries over the cache, causal (query i sees keys up to T - n + i); a cache
      // holds at least n tokens for it.
      if (c.context >= c.n) {
        const queries = randomTokens(random, c.heads, c.n);
        expectClose(cache.attend(0, queries.q), mirror.attend(queries.q), `${c.name}: attend`, TOLERANCE);
      }

      // step: the n tokens appended, then their queries attend (their own keys included).
      const step = randomTokens(random, c.heads, c.n);
      const stepped = cache.step(0, step.q, step.k, step.v);
      mirror.append(step.k, step.v);
      expectClose(stepped, mirror.attend(step.q), `${c.name}: step`, TOLERANCE);
      // The causal mask matters: the first query, were it to see every key, would differ.
      const rowLength = c.heads.qHeads * c.heads.headDim;
      const unmasked = mirror.attend(step.q.subarray(0, rowLength));
      expect(relativeL2(stepped.subarray(0, rowLength), unmasked), `${c.name}: the first query sees the later keys`).toBeGreaterThan(1e-3);
    });
  }
});
