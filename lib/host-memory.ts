import { addon } from './native.js';

/**
 * Host memory kvslim keeps between calls so the next call does not map and fault it again. A
 * server watching its memory reads it here and gives the idle part back with releaseHostMemory().
 */
export interface HostMemory {
  /** Bytes the CPU page pool has mapped for KV pages (4 MiB slabs on 2 MiB pages), live caches' pages included. */
  pagesMapped: number;
  /** Of pagesMapped, bytes in free blocks kept for the next pages (the pool unmaps idle slabs past 256 MiB of them). */
  pagesIdle: number;
  /**
   * Bytes of the CPU attention drivers' scratch: per calling thread (the main thread, and the
   * worker threads of async calls), f32 copies of a prompt's keys, values, queries and outputs,
   * kept up to 256 MiB per buffer.
   */
  scratch: number;
}

export function hostMemory(): HostMemory {
  return addon.hostMemory();
}

/**
 * Gives back to the system the host memory kept for reuse that no cache and no running call
 * holds: page-pool slabs without a live page, and the scratch of every thread not inside a call
 * (an async call running on a worker keeps its own). Returns the bytes given back. Results never
 * change; the next large call only maps and faults its memory again.
 */
export function releaseHostMemory(): number {
  return addon.releaseHostMemory();
}
