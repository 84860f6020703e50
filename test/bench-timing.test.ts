// The bench's timing helpers: the cold-cache eviction size (twice the last-level cache read from sysfs,
// within bounds) and the order of interleaved runs.
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { evictBytes, interleavedOrder, lastLevelCacheBytes } from '../bench/timing.js';

const MiB = 2 ** 20;
const root = mkdtempSync(join(tmpdir(), 'kvslim-cache-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

/** A fake cpu0/cache directory with one indexN entry per [level, size]. */
function cacheTree(name: string, entries: [string, string][]): string {
  const dir = join(root, name);
  entries.forEach(([level, size], i) => {
    mkdirSync(join(dir, `index${i}`), { recursive: true });
    writeFileSync(join(dir, `index${i}`, 'level'), `${level}\n`);
    writeFileSync(join(dir, `index${i}`, 'size'), `${size}\n`);
  });
  return dir;
}

describe('bench eviction size', () => {
  it('reads the highest cache level, in K, M or plain bytes', () => {
    expect(lastLevelCacheBytes(cacheTree('l3', [['1', '48K'], ['1', '32K'], ['2', '2048K'], ['3', '491520K']]))).toBe(491520 * 1024);
    expect(lastLevelCacheBytes(cacheTree('l2only', [['1', '64K'], ['2', '4M']]))).toBe(4 * MiB);
    expect(lastLevelCacheBytes(cacheTree('bytes', [['3', '1000']]))).toBe(1000);
  });

  it('is null without a readable tree or sizes', () => {
    expect(lastLevelCacheBytes(join(root, 'missing'))).toBeNull();
    expect(lastLevelCacheBytes(cacheTree('garbled', [['x', '12Q']]))).toBeNull();
  });

  it('evicts twice the last-level cache, at least 256 MiB, at most an eighth of memory', () => {
    const GiB = 2 ** 30;
    expect(evictBytes(null, 64 * GiB)).toBe(256 * MiB);
    expect(evictBytes(32 * MiB, 64 * GiB)).toBe(256 * MiB);
    expect(evictBytes(480 * MiB, 64 * GiB)).toBe(960 * MiB);
    expect(evictBytes(480 * MiB, 4 * GiB)).toBe(512 * MiB);
    expect(evictBytes(null, 256 * MiB)).toBe(64 * MiB);
  });
});

describe('bench interleaved runs', () => {
  it('alternates the order, so every item is as often first as last, and leaves its input alone', () => {
    const items = ['full', 'snapkv', 'h2o'];
    const runs = [0, 1, 2, 3].map((run) => interleavedOrder(items, run));
    expect(runs).toEqual([items, ['h2o', 'snapkv', 'full'], items, ['h2o', 'snapkv', 'full']]);
    expect(items).toEqual(['full', 'snapkv', 'h2o']);
    // The mean position over an even number of runs is the middle for every item.
    for (const item of items) expect(runs.reduce((sum, order) => sum + order.indexOf(item), 0) / runs.length).toBe(1);
  });
});
