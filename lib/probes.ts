import { addon } from './native.js';
import { positiveInteger } from './validate.js';

/**
 * Measured machine limits, for judging kernels against them in the same run (the bench uses them).
 * `readBytesPerSecond`: best streaming read rate over a buffer far larger than the caches;
 * `fmaFlopsPerSecond`: best f32 FMA rate of the active SIMD level. Both on `threads` threads.
 */
export interface MachineLimits {
  readBytesPerSecond: number;
  fmaFlopsPerSecond: number;
  threads: number;
}

export function probeMachine(options: { bufferMiB?: number; threads?: number; repeats?: number } = {}): MachineLimits {
  const threads = options.threads === undefined ? 0 : positiveInteger('threads', options.threads, 1024);
  const repeats = options.repeats === undefined ? 5 : positiveInteger('repeats', options.repeats, 100);
  const bufferMiB = options.bufferMiB === undefined ? 1024 : positiveInteger('bufferMiB', options.bufferMiB, 65536);
  return {
    readBytesPerSecond: addon.probeBandwidth(bufferMiB, threads, repeats),
    fmaFlopsPerSecond: addon.probeFmaPeak(threads, repeats),
    threads: threads === 0 ? addon.backends().cpu.threads : threads,
  };
}
