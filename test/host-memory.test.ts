// hostMemory() / releaseHostMemory(): what the CPU backend keeps between calls (page-pool slabs,
// the drivers' per-thread scratch) and giving back what no cache and no running call holds. A
// release never changes a result, never takes a live cache's pages, and skips the scratch of an
// async call in flight (ScratchLease in native/cpu/scratch.h).
import { beforeAll, describe, expect, it } from 'vitest';

import { KVCache, hostMemory, releaseHostMemory } from '../lib/index.js';
import { ensureCompiled } from './helpers/dist.js';
import { disposedAfterEach, held } from './helpers/lifetime.js';
import { expectIdentical } from './helpers/outputs.js';
import { Random } from './helpers/random.js';

const [qHeads, kvHeads, headDim] = [8, 2, 64];

function prompt(seed: number, n: number) {
  const random = new Random(seed);
  return { q: random.tensor(n * qHeads * headDim), k: random.tensor(n * kvHeads * headDim), v: random.tensor(n * kvHeads * headDim) };
}

describe('hostMemory() and releaseHostMemory()', () => {
  const open = disposedAfterEach<KVCache>();
  beforeAll(() => ensureCompiled());
  const make = () => held(open, new KVCache({ layers: 2, qHeads, kvHeads, headDim, device: 'cpu' }));

  it('counts a prefill\'s scratch and a cache\'s pages; a release frees the idle part only', () => {
    releaseHostMemory();
    const empty = hostMemory();
    expect(empty).toEqual({ pagesMapped: 0, pagesIdle: 0, scratch: 0 });

    const { q, k, v } = prompt(1, 1500);
    const live = make();
    const first = live.prefill(0, q, k, v);
    const used = hostMemory();
    expect(used.scratch).toBeGreaterThan(0);
    expect(used.pagesMapped).toBeGreaterThanOrEqual(live.stats().bytes.allocated);
    expect(used.pagesIdle).toBeLessThan(used.pagesMapped);

    // A second cache, disposed: its pages become idle.
    const gone = make();
    gone.prefill(0, q, k, v);
    const goneBytes = gone.stats().bytes.allocated;
    expect(goneBytes).toBeGreaterThan(0);
    const before = hostMemory();
    gone.dispose();
    const after = hostMemory();
    expect(after.pagesIdle - before.pagesIdle).toBe(goneBytes);

    const last = q.subarray((1500 - 1) * qHeads * headDim);
    const attended = live.attend(0, last);
    const released = releaseHostMemory();
    const now = hostMemory();
    expect(now.scratch).toBe(0);
    expect(released).toBeGreaterThanOrEqual(after.scratch);
    expect(released).toBe(after.scratch + after.pagesMapped - now.pagesMapped);
    // The live cache's pages stay, and it goes on as before: the same prompt again in layer 1
    // (scratch mapped anew) gives layer 0's bits, and layer 0 still attends as it did.
    expect(now.pagesMapped).toBeGreaterThanOrEqual(live.stats().bytes.allocated);
    expectIdentical(live.prefill(1, q, k, v), first, 'layer 1 after the release');
    expectIdentical(live.attend(0, last), attended, 'layer 0 after the release');

    live.dispose();
    releaseHostMemory();
    expect(hostMemory()).toEqual({ pagesMapped: 0, pagesIdle: 0, scratch: 0 });
  });

  it('an async prefill in flight keeps its scratch through releases', async () => {
    const n = 3000;
    const { q, k, v } = prompt(2, n);
    const expected = make().prefill(0, q, k, v);
    releaseHostMemory();
    const cache = make();
    let done = false;
    let releases = 0;
    const pending = cache.prefillAsync(0, q, k, v).finally(() => { done = true; });
    await new Promise<void>((resolve) => {
      const tick = () => {
        if (done) {
          resolve();
          return;
        }
        releaseHostMemory();
        releases++;
        setImmediate(tick);
      };
      tick();
    });
    expectIdentical(await pending, expected, 'async prefill under releases');
    expect(releases).toBeGreaterThan(0);
    // The worker's scratch is freed by a release once its call is done.
    releaseHostMemory();
    expect(hostMemory().scratch).toBe(0);
  });

  it('with nothing kept, a release gives back nothing', () => {
    releaseHostMemory();
    expect(releaseHostMemory()).toBe(0);
    expect(hostMemory()).toEqual({ pagesMapped: 0, pagesIdle: 0, scratch: 0 });
  });
});
