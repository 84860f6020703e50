// The timing loop: warm-up runs, then timed runs until both a minimum count and a minimum total
// time are reached (capped), summarized as median and spread. Each run times itself, so per-run
// setup (a fresh cache, a cache flush) stays outside the measurement.
import { readdirSync, readFileSync } from 'node:fs';
import { availableParallelism, totalmem } from 'node:os';

import { KVCache } from '../lib/index.js';

/** How many runs to make. */
export interface TimingPlan {
  warmupRuns: number;
  minRuns: number;
  maxRuns: number;
  /** Keep running (up to maxRuns) until the timed runs add up to this. */
  minTotalMs: number;
}

export interface TimeStats {
  medianMs: number;
  p10Ms: number;
  p90Ms: number;
  minMs: number;
  maxMs: number;
  meanMs: number;
  runs: number;
  warmupRuns: number;
  /** What the spread column shows: p10–p90 from 10 runs on, min–max below. */
  spread: 'p10-p90' | 'min-max';
  spreadLowMs: number;
  spreadHighMs: number;
  samplesMs: number[];
}

/** Milliseconds `work` takes, by the monotonic high-resolution clock. */
export function elapsedMs(work: () => void): number {
  const start = process.hrtime.bigint();
  work();
  return Number(process.hrtime.bigint() - start) / 1e6;
}

/** Runs `once` per the plan; `once` returns the milliseconds of its timed part. */
export function measure(plan: TimingPlan, once: () => number): TimeStats {
  for (let i = 0; i < plan.warmupRuns; i++) once();
  const samples: number[] = [];
  let totalMs = 0;
  while (samples.length < plan.maxRuns && (samples.length < plan.minRuns || totalMs < plan.minTotalMs)) {
    const ms = once();
    samples.push(ms);
    totalMs += ms;
  }
  return summarize(samples, plan.warmupRuns);
}

/**
 * The order of interleaved run `run`: `items` as they are on even runs, reversed on odd ones
 * (A B, B A, A B, ...), so a drift over the runs lands on every item alike instead of on the later.
 */
export function interleavedOrder<T>(items: readonly T[], run: number): T[] {
  return run % 2 === 0 ? [...items] : [...items].reverse();
}

/** Samples taken elsewhere (interleaved runs), summarized as measure() does. */
export function summarizeSamples(samples: number[]): TimeStats {
  return summarize(samples, 0);
}

function summarize(samples: number[], warmupRuns: number): TimeStats {
  const sorted = [...samples].sort((a, b) => a - b);
  const p10Ms = quantile(sorted, 0.1), p90Ms = quantile(sorted, 0.9);
  const minMs = sorted[0], maxMs = sorted[sorted.length - 1];
  const spread = sorted.length >= 10 ? 'p10-p90' : 'min-max';
  return {
    medianMs: quantile(sorted, 0.5), p10Ms, p90Ms, minMs, maxMs,
    meanMs: samples.reduce((a, b) => a + b, 0) / samples.length,
    runs: samples.length, warmupRuns, spread,
    spreadLowMs: spread === 'p10-p90' ? p10Ms : minMs,
    spreadHighMs: spread === 'p10-p90' ? p90Ms : maxMs,
    samplesMs: samples.map((ms) => Math.round(ms * 1e4) / 1e4),
  };
}

/** Linear interpolation between closest ranks (numpy's default). */
function quantile(sorted: number[], p: number): number {
  const position = (sorted.length - 1) * p;
  const below = Math.floor(position), above = Math.ceil(position);
  return sorted[below] + (sorted[above] - sorted[below]) * (position - below);
}

/**
 * The last-level cache's bytes (Linux sysfs: the highest cache level of cpu0), or null where it
 * cannot be read.
 */
export function lastLevelCacheBytes(root = '/sys/devices/system/cpu/cpu0/cache'): number | null {
  let best: { level: number; bytes: number } | null = null;
  try {
    for (const entry of readdirSync(root)) {
      if (!/^index\d+$/.test(entry)) continue;
      const level = Number(readFileSync(`${root}/${entry}/level`, 'utf8').trim());
      const size = /^(\d+)([KMG]?)$/.exec(readFileSync(`${root}/${entry}/size`, 'utf8').trim());
      if (!Number.isInteger(level) || size === null) continue;
      const bytes = Number(size[1]) * { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30 }[size[2] as '' | 'K' | 'M' | 'G'];
      if (best === null || level > best.level) best = { level, bytes };
    }
  } catch {
    return null;
  }
  return best?.bytes ?? null;
}

/**
 * Bytes read between decode runs to push the KV out of the last-level cache: twice its size, at
 * least 256 MiB (where the size is unknown: 256 MiB), at most an eighth of the memory (and never
 * under 64 MiB). 256 MiB alone left part of a 16K-64K-token cache in a 480 MB L3 (a server CPU's):
 * those decodes measured 4-9% faster than cold.
 */
export const EVICT_BYTES = evictBytes(lastLevelCacheBytes(), totalmem());

export function evictBytes(cacheBytes: number | null, memoryBytes: number): number {
  const MiB = 2 ** 20;
  const wanted = Math.max(256 * MiB, 2 * (cacheBytes ?? 0));
  return Math.max(64 * MiB, Math.min(wanted, Math.floor(memoryBytes / 8 / MiB) * MiB));
}
let evictBuffer: Int32Array | null = null;
let evictSink = 0;

/**
 * Reads one word per 64-byte line of an EVICT_BYTES buffer, so the next decode run finds its KV in
 * DRAM, as a real decode step does after the other layers ran. Reads, not writes: glibc's memset
 * of large buffers uses non-temporal stores, which would leave the KV lines in place. Then wakes
 * the thread pool (wakeWorkers): the read takes milliseconds, long enough for its workers to block.
 */
export function evictCaches(): void {
  evictBuffer ??= new Int32Array(EVICT_BYTES / 4).fill(1);
  let sum = 0;
  for (let i = 0; i < evictBuffer.length; i += 16) sum = (sum + evictBuffer[i]) | 0;
  evictSink ^= sum;
  wakeWorkers();
}

/** Shape of the waking decode: this many token-heads per worker wakes every worker (native/cpu/attention_decode.cc). */
const WAKE = { qHeads: 8, kvHeads: 8, headDim: 64, tokenHeadsPerThread: 256 } as const;
let waker: { cache: KVCache; q: Float32Array; out: Float32Array } | null = null;

/**
 * One small decode on a cache of its own, on every worker of the pool: a worker spins for about
 * 200 µs after a job, then blocks, and waking it costs tens of microseconds in a VM. In a model's
 * decode step the previous layer's work keeps the pool (and the attend path's code) warm; after
 * evictCaches() it would not be, and the first timed call would pay the wake-up, which swamps
 * small caches. Its KV (a few MB) does not bring the timed layers' KV back into the caches.
 */
export function wakeWorkers(): void {
  if (waker === null) {
    const { qHeads, kvHeads, headDim, tokenHeadsPerThread } = WAKE;
    const tokens = Math.max(1024, Math.ceil((tokenHeadsPerThread * availableParallelism()) / kvHeads));
    const cache = new KVCache({ layers: 1, qHeads, kvHeads, headDim, device: 'cpu', policy: { store: { kind: 'f16' } } });
    const kv = new Float32Array(tokens * kvHeads * headDim).map((_, i) => Math.sin(i));
    cache.append(0, kv, kv);
    waker = { cache, q: new Float32Array(qHeads * headDim).fill(0.01), out: new Float32Array(qHeads * headDim) };
  }
  waker.cache.attend(0, waker.q, { out: waker.out });
}
