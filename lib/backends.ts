import { addon, type NativeBackends } from './native.js';
import { positiveInteger } from './validate.js';

/** Where attention runs. `auto` picks CUDA when a GPU answers, else the CPU. */
export type Device = 'auto' | 'cpu' | 'cuda';

/**
 * What this build and machine offer: the CPU SIMD level in use (`KVSLIM_SIMD` can force a lower
 * one), the thread-pool size, the CPU vendor and where the kernels prefetch streamed KV (`l1` on
 * AMD, `l2` elsewhere; `KVSLIM_PREFETCH` overrides), and whether CUDA was compiled in and a GPU
 * answered (`reason` says why not). `cuda` is null when the addon was built without CUDA.
 */
export interface Backends {
  cpu: NativeBackends['cpu'];
  cuda: Omit<NativeBackends['cuda'], 'built'> | null;
}

export function backends(): Backends {
  const found = addon.backends();
  const { built, ...cuda } = found.cuda;
  return { cpu: found.cpu, cuda: built ? cuda : null };
}

/** Resizes the native thread pool shared by every cache (default: os.availableParallelism()). */
export function setThreads(threads: number): void {
  addon.setThreads(positiveInteger('threads', threads, 1024));
}
