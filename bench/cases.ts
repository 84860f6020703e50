// The declared matrix of bench cases and how one case is run: build the cache, check its output
// against the plain-JS reference, and only then time it.
import { KVCache } from '../lib/index.js';
import { attentionPlainJS, relativeL2Error } from './baseline.js';
import { elapsedMs, evictCaches, measure, type TimeStats, type TimingPlan } from './timing.js';

/** One attention layer of Llama-3-8B: GQA with 4 query heads per kv head. */
export const MODEL = { name: 'Llama-3-8B', qHeads: 32, kvHeads: 8, headDim: 128 } as const;
export const STORES = ['f32', 'f16', 'bf16'] as const;
export type Store = (typeof STORES)[number];
export const BYTES_PER_ELEMENT: Record<Store, number> = { f32: 4, f16: 2, bf16: 2 };
/** Largest relative L2 error (vs the plain-JS reference) a case may show and still be timed. */
export const TOLERANCE = 1e-3;
/** Tokens per append call while a decode cache is filled. */
export const APPEND_CHUNK_TOKENS = 4096;
/** Prefill rows checked against the reference: the first and last few query positions. */
const PREFILL_CHECK_ROWS = 4;

export type CaseKind = 'decode' | 'prefill';
export type CaseDevice = 'cpu' | 'cuda';

export interface CaseSpec {
  /** Names the row in the table and JSON; `--case <id>` reruns it alone. */
  id: string;
  kind: CaseKind;
  device: CaseDevice;
  store: Store;
  /** Decode: tokens in the cache. Prefill: prompt tokens (as many queries). */
  tokens: number;
  /**
   * Decode only: query tokens attending at once (default 1), causally over the cache's last
   * positions. 5 is a speculative-decoding step: the target model checks 4 draft tokens and one more.
   */
  queries?: number;
}

export interface Matrix {
  cases: CaseSpec[];
  /** Size of the plain-JS causal prefill the prefill rows are compared with. */
  jsPrefillTokens: number;
}

export function tokenLabel(tokens: number): string {
  return tokens % 1024 === 0 ? `${tokens / 1024}K` : String(tokens);
}

function caseOf(kind: CaseKind, device: CaseDevice, store: Store, tokens: number, queries = 1): CaseSpec {
  const id = `${kind}-${store}-${tokenLabel(tokens)}${queries > 1 ? `-x${queries}` : ''}${device === 'cpu' ? '' : `-${device}`}`;
  return queries > 1 ? { id, kind, device, store, tokens, queries } : { id, kind, device, store, tokens };
}

/** Query tokens of the speculative-decoding row (4 drafts and the next token). */
export const SPECULATIVE_QUERIES = 5;

/**
 * The full matrix: decode at 4K/16K/64K tokens for each store and a speculative step (5 queries)
 * over 64K f16, causal prefill at 4K (f16, f32)
 * plus a prefill at the plain-JS size for a same-size comparison; the same on CUDA when a GPU
 * answers. `quick`: decode at 4K and a 1K prefill, for smoke tests.
 */
export function declareMatrix(options: { quick: boolean; cuda: boolean }): Matrix {
  const jsPrefillTokens = options.quick ? 256 : 512;
  const decodeTokens = options.quick ? [4096] : [4096, 16384, 65536];
  const cases: CaseSpec[] = [];
  const devices: CaseDevice[] = options.cuda ? ['cpu', 'cuda'] : ['cpu'];
  for (const device of devices) {
    for (const tokens of decodeTokens) {
      for (const store of STORES) cases.push(caseOf('decode', device, store, tokens));
    }
    if (!options.quick) cases.push(caseOf('decode', device, 'f16', 65536, SPECULATIVE_QUERIES));
  }
  for (const device of devices) {
    if (options.quick) {
      cases.push(caseOf('prefill', device, 'f16', 1024));
    } else {
      cases.push(caseOf('prefill', device, 'f16', 4096));
      if (device === 'cpu') {
        cases.push(caseOf('prefill', device, 'f32', 4096));
        cases.push(caseOf('prefill', device, 'f16', jsPrefillTokens));
      }
    }
  }
  return { cases, jsPrefillTokens };
}

/** K+V bytes a decode step reads: every token, both tensors, once (for all of its queries). */
export function kvBytes(spec: CaseSpec): number {
  return spec.tokens * MODEL.kvHeads * MODEL.headDim * 2 * BYTES_PER_ELEMENT[spec.store];
}

/** Causal attention FLOPs: QK^T and PV, 2 FLOPs per multiply-add, query i sees i + 1 keys. */
export function prefillFlops(tokens: number): number {
  return 4 * MODEL.qHeads * MODEL.headDim * ((tokens * (tokens + 1)) / 2);
}

export const TOKEN_STRIDE = MODEL.kvHeads * MODEL.headDim;
export const QUERY_STRIDE = MODEL.qHeads * MODEL.headDim;

/** What running a case measured; `time` is absent when the check failed. */
export interface CaseRun {
  check: { relL2Error: number; tolerance: number; rows: string; passed: boolean };
  time?: TimeStats;
  /** Decode: milliseconds to append the tokens (chunks of APPEND_CHUNK_TOKENS), converting to the store. */
  fillMs?: number;
}

function newCache(spec: CaseSpec): KVCache {
  return new KVCache({
    layers: 1, qHeads: MODEL.qHeads, kvHeads: MODEL.kvHeads, headDim: MODEL.headDim,
    device: spec.device, policy: { store: { kind: spec.store } },
  });
}

function checkOf(actual: Float32Array, expected: Float32Array, rows: string): CaseRun['check'] {
  const relL2Error = relativeL2Error(actual, expected);
  // NaN fails too.
  return { relL2Error, tolerance: TOLERANCE, rows, passed: relL2Error <= TOLERANCE };
}

/**
 * Decode: a cache of `spec.tokens` tokens (first tokens of k, v), the queries q (one, or
 * `spec.queries` at the last positions) attend to them. `reference` is the plain-JS output for the
 * same q, k, v. CPU runs are timed cold (see
 * evictCaches); the check call doubles as the first warm-up.
 */
export function runDecode(
  spec: CaseSpec, data: { k: Float32Array; v: Float32Array; q: Float32Array; reference: Float32Array }, plan: TimingPlan,
): CaseRun {
  const cache = newCache(spec);
  try {
    const fillMs = elapsedMs(() => {
      for (let start = 0; start < spec.tokens; start += APPEND_CHUNK_TOKENS) {
        const end = Math.min(spec.tokens, start + APPEND_CHUNK_TOKENS);
        cache.append(0, data.k.subarray(start * TOKEN_STRIDE, end * TOKEN_STRIDE), data.v.subarray(start * TOKEN_STRIDE, end * TOKEN_STRIDE));
      }
    });
    // One output array reused across steps, as a decode loop in a server would.
    const out = new Float32Array(data.q.length);
    const check = checkOf(cache.attend(0, data.q, { out }), data.reference, 'all');
    if (!check.passed) return { check, fillMs };
    const cold = spec.device === 'cpu';
    const time = measure(plan, () => {
      if (cold) evictCaches();
      return elapsedMs(() => cache.attend(0, data.q, { out }));
    });
    return { check, time, fillMs };
  } finally {
    cache.dispose();
  }
}

/**
 * Causal prefill of `spec.tokens` tokens into a fresh cache per run (cache creation untimed).
 * Checked on the first and last PREFILL_CHECK_ROWS query rows against the plain-JS reference, or on
 * every row when `fullReference` (the JS baseline's own output at this size) is given.
 */
export function runPrefill(
  spec: CaseSpec,
  data: { q: Float32Array; k: Float32Array; v: Float32Array; fullReference?: Float32Array },
  plan: (checkMs: number) => TimingPlan,
): CaseRun {
  const q = data.q.subarray(0, spec.tokens * QUERY_STRIDE);
  const k = data.k.subarray(0, spec.tokens * TOKEN_STRIDE);
  const v = data.v.subarray(0, spec.tokens * TOKEN_STRIDE);
  // The output array is reused across runs (a server keeps its activation buffers); a fresh
  // 64 MiB array per call would add its page faults to every run.
  const output = new Float32Array(q.length);
  const prefillOnce = (): { out: Float32Array; ms: number } => {
    const cache = newCache(spec);
    try {
      const ms = elapsedMs(() => {
        cache.prefill(0, q, k, v, { out: output });
      });
      return { out: output, ms };
    } finally {
      cache.dispose();
    }
  };
  const first = prefillOnce();
  let check: CaseRun['check'];
  if (data.fullReference !== undefined) {
    check = checkOf(first.out, data.fullReference, `all ${spec.tokens}`);
  } else {
    const rows = checkedRows(spec.tokens);
    const pick = (source: Float32Array) => {
      const picked = new Float32Array(rows.length * QUERY_STRIDE);
      rows.forEach((row, i) => picked.set(source.subarray(row * QUERY_STRIDE, (row + 1) * QUERY_STRIDE), i * QUERY_STRIDE));
      return picked;
    };
    const expected = attentionPlainJS({
      q: pick(q), k, v, qHeads: MODEL.qHeads, kvHeads: MODEL.kvHeads, headDim: MODEL.headDim, positions: rows,
    });
    check = checkOf(first.out.length === q.length ? pick(first.out) : first.out, expected, describeRows(rows));
  }
  if (!check.passed) return { check };
  const time = measure(plan(first.ms), () => prefillOnce().ms);
  return { check, time };
}

function checkedRows(tokens: number): number[] {
  const rows = new Set<number>();
  for (let i = 0; i < PREFILL_CHECK_ROWS; i++) {
    rows.add(Math.min(i, tokens - 1));
    rows.add(Math.max(0, tokens - PREFILL_CHECK_ROWS + i));
  }
  return [...rows].sort((a, b) => a - b);
}

function describeRows(rows: number[]): string {
  const n = PREFILL_CHECK_ROWS;
  return rows.length === 2 * n ? `rows ${rows[0]}-${rows[n - 1]}, ${rows[n]}-${rows[2 * n - 1]}` : `rows ${rows.join(',')}`;
}
