// Standalone key indexes (createKeyIndex; native/core/index/) and Quest's page bounds (pageBounds),
// against float64 references written here: flat is the exact top-k; ivf scanning every list equals
// it; ivf and graph reach bounded recall at their defaults on in-distribution data and after
// incremental adds; Quest's bound is never below a page's best score. Plus the errors.
import { describe, expect, it } from 'vitest';

import { createKeyIndex, KeyIndex, pageBounds } from '../lib/index.js';
import { expectError } from './helpers/errors.js';
import { Random } from './helpers/random.js';
import { roundTo } from './reference/half.js';
import { checkTopK } from './reference/loading.js';

function maxDot(queries: Float32Array, dim: number, keys: Float32Array, id: number): number {
  let best = -Infinity;
  for (let r = 0; r < queries.length / dim; r++) {
    let sum = 0;
    for (let d = 0; d < dim; d++) sum += queries[r * dim + d] * keys[id * dim + d];
    best = Math.max(best, sum);
  }
  return best;
}

function exactTop(queries: Float32Array, dim: number, keys: Float32Array, k: number): number[] {
  const n = keys.length / dim;
  return Array.from({ length: n }, (_, i) => i)
    .map((i) => [i, maxDot(queries, dim, keys, i)] as const)
    .sort((a, b) => b[1] - a[1] || a[0] - b[0])
    .slice(0, k)
    .map(([i]) => i);
}

/** Keys in a few clusters (structure an index can use) with noise. */
function clusteredKeys(random: Random, n: number, dim: number, clusters = 16): Float32Array {
  const centers = random.tensor(clusters * dim, 2);
  const keys = random.tensor(n * dim, 0.7);
  for (let i = 0; i < n; i++) {
    const c = random.integer(clusters);
    for (let d = 0; d < dim; d++) keys[i * dim + d] += centers[c * dim + d];
  }
  return keys;
}

function recall(index: KeyIndex, queries: Float32Array[], dim: number, keys: Float32Array, k: number, beam?: number): number {
  let found = 0;
  for (const q of queries) {
    const exact = new Set(exactTop(q, dim, keys, k));
    for (const id of index.search(q, k, beam === undefined ? {} : { beam }).ids) if (exact.has(id)) found++;
  }
  return found / (queries.length * k);
}

describe('flat index', () => {
  for (const [dim, rows] of [[1, 1], [5, 3], [64, 4], [128, 1]] as const) {
    it(`returns the exact top-k by max over the query rows (dim ${dim}, ${rows} rows)`, () => {
      const random = new Random(dim * 10 + rows);
      const keys = random.tensor(700 * dim);
      const index = createKeyIndex({ kind: 'flat', dim, keys });
      expect(index.size).toBe(700);
      for (let trial = 0; trial < 5; trial++) {
        const q = random.tensor(rows * dim);
        const hits = index.search(q, 20);
        expect(hits.scanned).toBe(700);
        const ids = Array.from(hits.ids);
        expect(checkTopK(ids, Array.from({ length: 700 }, (_, i) => i), (i) => maxDot(q, dim, keys, i), 20, 1e-4)).toBeNull();
        for (let i = 0; i < ids.length; i++) expect(hits.scores[i]).toBeCloseTo(maxDot(q, dim, keys, ids[i]), 3);
        for (let i = 1; i < ids.length; i++) expect(hits.scores[i]).toBeLessThanOrEqual(hits.scores[i - 1]);
      }
      expect(index.search(random.tensor(dim), 5000).ids.length).toBe(700); // k > size: everything
      index.dispose();
    });
  }
});

describe('ivf index', () => {
  it('scanning every list equals the exact top-k; fewer lists scan fewer keys', () => {
    const random = new Random(3);
    const dim = 32;
    const keys = clusteredKeys(random, 3000, dim);
    const index = createKeyIndex({ kind: 'ivf', dim, keys, lists: 40 });
    for (let trial = 0; trial < 5; trial++) {
      const q = random.tensor(4 * dim);
      const all = index.search(q, 25, { probes: 40 });
      expect(all.scanned).toBeGreaterThanOrEqual(3000);
      const problem = checkTopK(Array.from(all.ids), Array.from({ length: 3000 }, (_, i) => i), (i) => maxDot(q, dim, keys, i), 25, 1e-4);
      expect(problem).toBeNull();
      const few = index.search(q, 25, { probes: 4 });
      expect(few.scanned).toBeLessThan(all.scanned);
      expect(few.ids.length).toBe(25);
    }
  });

  it('asked for more keys than its probed lists hold, probes further lists: k distinct ids whenever the index holds k keys', () => {
    const random = new Random(9);
    const dim = 16;
    const keys = clusteredKeys(random, 2000, dim);
    const index = createKeyIndex({ kind: 'ivf', dim, keys, lists: 50 });
    for (const k of [100, 400, 2000]) {
      const q = random.tensor(2 * dim);
      const hits = index.search(q, k, { probes: 1 });
      expect(hits.ids.length, `k ${k}`).toBe(k);
      expect(new Set(hits.ids).size, `k ${k}`).toBe(k);
      expect(hits.scanned).toBeGreaterThanOrEqual(k);
    }
    // k = every key: every list is scanned, the exact top-k.
    const q = random.tensor(dim);
    const all = Array.from(index.search(q, 2000, { probes: 1 }).ids);
    expect(checkTopK(all, Array.from({ length: 2000 }, (_, i) => i), (i) => maxDot(q, dim, keys, i), 2000, 1e-4)).toBeNull();
  });

  it('reaches bounded recall at moderate probes, also after incremental adds', () => {
    const random = new Random(4);
    const dim = 48;
    const keys = clusteredKeys(random, 4000, dim);
    const index = createKeyIndex({ kind: 'ivf', dim, keys: keys.subarray(0, 3000 * dim) });
    index.add(keys.subarray(3000 * dim));
    expect(index.size).toBe(4000);
    const queries = Array.from({ length: 20 }, () => random.tensor(dim));
    let found = 0;
    for (const q of queries) {
      const exact = new Set(exactTop(q, dim, keys, 10));
      for (const id of index.search(q, 10, { probes: 16 }).ids) if (exact.has(id)) found++;
    }
    expect(found / (queries.length * 10)).toBeGreaterThan(0.8);
  });
});

describe('ties', () => {
  it('equal scores rank the lower id first: flat, and ivf scanning every list, return exactly the float64 order', () => {
    const random = new Random(8);
    const dim = 8, n = 600;
    // Small integers: every dot product is exact in f32 whatever the summation order, so tied
    // keys score the same bits, and ties are common (also at the k-th place).
    const integers = (count: number) => Float32Array.from({ length: count }, () => random.integer(5) - 2);
    const keys = integers(n * dim);
    const flat = createKeyIndex({ kind: 'flat', dim, keys });
    const ivf = createKeyIndex({ kind: 'ivf', dim, keys, lists: 12 });
    for (let trial = 0; trial < 10; trial++) {
      const q = integers((1 + (trial % 3)) * dim);
      const k = 5 + 7 * trial;
      const expected = exactTop(q, dim, keys, k);
      expect(Array.from(flat.search(q, k).ids), `flat trial ${trial}`).toEqual(expected);
      expect(Array.from(ivf.search(q, k, { probes: 12 }).ids), `ivf trial ${trial}`).toEqual(expected);
    }
  });
});

describe('graph index', () => {
  it('reaches recall >= 0.95 at beam 128 with training queries, and after incremental adds', () => {
    const random = new Random(5);
    const dim = 64;
    const keys = clusteredKeys(random, 5000, dim);
    const training = random.tensor(1500 * dim);
    const index = createKeyIndex({ kind: 'graph', dim, keys: keys.subarray(0, 4000 * dim), queries: training });
    index.add(keys.subarray(4000 * dim));
    expect(index.size).toBe(5000);
    const queries = Array.from({ length: 25 }, () => random.tensor(dim));
    // Measured 0.89 at the default beam (64 for k = 10), 0.99 at 128.
    expect(recall(index, queries, dim, keys, 10)).toBeGreaterThanOrEqual(0.8);
    expect(recall(index, queries, dim, keys, 10, 128)).toBeGreaterThanOrEqual(0.95);
    // Added keys are reachable: an added key that is its own best match (in MIPS a larger key
    // nearby may win) is found by a search with it as the query.
    let checked = 0;
    for (let id = 4000; id < 5000 && checked < 20; id += 7) {
      const q = keys.slice(id * dim, (id + 1) * dim).map((x) => 3 * x);
      if (exactTop(q, dim, keys, 1)[0] !== id) continue;
      expect(index.search(q, 1, { beam: 256 }).ids[0], `key ${id}`).toBe(id);
      checked++;
    }
    expect(checked).toBe(20);
    expect(index.bytes).toBeGreaterThan(5000 * dim * 4);
  });

  for (const [dim, training] of [[64, true], [20, false], [1, true]] as const) {
    it(`keyType 'f16' keeps f16 keys in half the bytes and finds exactly what 'f32' finds (dim ${dim}, ${training ? 'queries' : 'keys as queries'})`, () => {
      const random = new Random(40 + dim);
      // Keys that are f16 values (as a cache's f16 store holds them): rounding them is exact.
      const keys = Float32Array.from(roundTo(clusteredKeys(random, 2500, dim), 'f16'));
      const queries = training ? random.tensor(600 * dim) : undefined;
      const wide = createKeyIndex({ kind: 'graph', dim, keys: keys.subarray(0, 2000 * dim), queries });
      const half = createKeyIndex({ kind: 'graph', dim, keys: keys.subarray(0, 2000 * dim), queries, keyType: 'f16' });
      wide.add(keys.subarray(2000 * dim));
      half.add(keys.subarray(2000 * dim));
      expect(half.size).toBe(2500);
      expect(wide.bytes - half.bytes).toBe(2500 * dim * 2);
      for (let trial = 0; trial < 12; trial++) {
        const q = random.tensor((1 + (trial % 4)) * dim);
        const k = trial === 11 ? 2500 : 10 + trial;  // the last asks for every key (exact scan)
        const a = wide.search(q, k, { beam: 64 + 8 * trial }), b = half.search(q, k, { beam: 64 + 8 * trial });
        expect(Array.from(b.ids), `trial ${trial}`).toEqual(Array.from(a.ids));
        expect(Array.from(b.scores)).toEqual(Array.from(a.scores));
        expect(b.scanned).toBe(a.scanned);
      }
      // Keys that are not f16 values are rounded: the index is the one over the rounded keys.
      const raw = random.tensor(300 * dim);
      const rounded = createKeyIndex({ kind: 'graph', dim, keys: Float32Array.from(roundTo(raw, 'f16')) });
      const coarse = createKeyIndex({ kind: 'graph', dim, keys: raw, keyType: 'f16' });
      const q = random.tensor(2 * dim);
      const [c, r] = [coarse.search(q, 30), rounded.search(q, 30)];
      expect(Array.from(c.ids)).toEqual(Array.from(r.ids));
      expect(Array.from(c.scores)).toEqual(Array.from(r.scores));
    });
  }

  it('a beam smaller than k still returns k keys (the search widens its beam to k)', () => {
    const random = new Random(10);
    const dim = 16;
    const keys = clusteredKeys(random, 1500, dim);
    const index = createKeyIndex({ kind: 'graph', dim, keys, beam: 8 });
    for (const [k, beam] of [[40, 8], [200, 16], [60, 59]] as const) {
      const q = random.tensor(2 * dim);
      const hits = index.search(q, k, { beam });
      expect(hits.ids.length, `k ${k} beam ${beam}`).toBe(k);
      expect(new Set(hits.ids).size).toBe(k);
      for (let i = 0; i < k; i++) expect(hits.scores[i]).toBeCloseTo(maxDot(q, dim, keys, hits.ids[i]), 3);
    }
    expect(index.search(random.tensor(dim), 30).ids.length).toBe(30);  // the index's own beam of 8
  });

  it('builds without training queries (keys as queries)', () => {
    const random = new Random(6);
    const dim = 24;
    const keys = clusteredKeys(random, 3000, dim);
    const index = createKeyIndex({ kind: 'graph', dim, keys });
    const queries = Array.from({ length: 20 }, () => random.tensor(dim));
    expect(recall(index, queries, dim, keys, 10, 128)).toBeGreaterThanOrEqual(0.9);
  });
});

describe('pageBounds (Quest)', () => {
  it('pages of 16 keys by default', () => {
    const random = new Random(16);
    const keys = random.tensor(40 * 3), queries = random.tensor(2 * 3);
    const bounds = pageBounds({ keys, queries, dim: 3 });
    expect(bounds).toHaveLength(3);
    expect(bounds).toEqual(pageBounds({ keys, queries, dim: 3, pageSize: 16 }));
  });

  for (const [dim, pageSize, n, rows] of [[1, 4, 10, 1], [7, 16, 101, 3], [128, 16, 256, 4], [33, 5, 52, 2]] as const) {
    it(`is an upper bound of every page's best score and equals the float64 bound (dim ${dim}, page ${pageSize}, ${n} keys)`, () => {
      const random = new Random(dim + n);
      const keys = random.tensor(n * dim);
      const queries = random.tensor(rows * dim);
      const bounds = pageBounds({ keys, queries, dim, pageSize });
      expect(bounds.length).toBe(Math.ceil(n / pageSize));
      for (let p = 0; p < bounds.length; p++) {
        let best = -Infinity, expected = -Infinity;
        const members = Array.from({ length: Math.min(pageSize, n - p * pageSize) }, (_, i) => p * pageSize + i);
        for (const id of members) best = Math.max(best, maxDot(queries, dim, keys, id));
        for (let r = 0; r < rows; r++) {
          let sum = 0;
          for (let d = 0; d < dim; d++) {
            const column = members.map((id) => keys[id * dim + d]);
            const q = queries[r * dim + d];
            sum += Math.max(q * Math.min(...column), q * Math.max(...column));
          }
          expected = Math.max(expected, sum);
        }
        expect(bounds[p] + 1e-4 * (1 + Math.abs(best))).toBeGreaterThanOrEqual(best);
        expect(Math.abs(bounds[p] - expected)).toBeLessThanOrEqual(1e-4 * (1 + Math.abs(expected)));
      }
    });
  }
});

describe('ivf index with f16 keys', () => {
  it("keyType 'f16' keeps f16 keys in half the bytes and finds exactly what 'f32' finds", () => {
    const random = new Random(44);
    const dim = 48;
    const keys = Float32Array.from(roundTo(clusteredKeys(random, 3000, dim), 'f16'));
    const wide = createKeyIndex({ kind: 'ivf', dim, keys: keys.subarray(0, 2500 * dim) });
    const half = createKeyIndex({ kind: 'ivf', dim, keys: keys.subarray(0, 2500 * dim), keyType: 'f16' });
    wide.add(keys.subarray(2500 * dim));
    half.add(keys.subarray(2500 * dim));
    expect(wide.bytes - half.bytes).toBe(3000 * dim * 2);
    for (let trial = 0; trial < 8; trial++) {
      const q = random.tensor((1 + (trial % 3)) * dim);
      const a = wide.search(q, 20, { probes: 1 + trial }), b = half.search(q, 20, { probes: 1 + trial });
      expect(Array.from(b.ids), `trial ${trial}`).toEqual(Array.from(a.ids));
      expect(Array.from(b.scores)).toEqual(Array.from(a.scores));
      expect(b.scanned).toBe(a.scanned);
    }
  });
});

describe('key index errors', () => {
  it('rejects bad input with a KVSlimError naming the argument', () => {
    const keys = new Random(7).tensor(40);
    expectError(() => createKeyIndex({ kind: 'hnsw' as 'flat', dim: 4, keys }), 'ERR_OPTION', /kind/);
    expectError(() => createKeyIndex({ kind: 'flat', dim: 0, keys }), 'ERR_OPTION', /dim/);
    expectError(() => createKeyIndex({ kind: 'flat', dim: 3, keys }), 'ERR_SHAPE', /keys/);
    expectError(() => createKeyIndex({ kind: 'flat', dim: 4, keys: new Float64Array(8) as unknown as Float32Array }), 'ERR_DTYPE', /keys/);
    expectError(() => createKeyIndex({ kind: 'graph', dim: 4, keys, degree: 1 }), 'ERR_OPTION', /degree/);
    expectError(() => createKeyIndex({ kind: 'ivf', dim: 4, keys, lists: -2 }), 'ERR_OPTION', /lists/);
    expectError(() => createKeyIndex({ kind: 'flat', dim: 4, keys, extra: 1 } as never), 'ERR_OPTION', /extra/);
    expectError(() => createKeyIndex({ kind: 'flat', dim: 4, keys, keyType: 'f16' }), 'ERR_OPTION', /keyType/);
    expectError(() => createKeyIndex({ kind: 'graph', dim: 4, keys, keyType: 'bf16' as 'f16' }), 'ERR_OPTION', /keyType/);
    // f16 keys must stay finite: a key past the f16 range is refused, by build and by add (which changes nothing).
    const wide = keys.slice();
    wide[9] = 70000;
    expectError(() => createKeyIndex({ kind: 'graph', dim: 4, keys: wide, keyType: 'f16' }), 'ERR_VALUE', /f16 range/);
    for (const kind of ['graph', 'ivf'] as const) {
      const half = createKeyIndex({ kind, dim: 4, keys, keyType: 'f16' });
      expectError(() => half.add(wide), 'ERR_VALUE', /f16 range/);
      expect(half.size).toBe(10);
      half.add(keys.map((x) => x * 1000));  // large but finite in f16
      expect(half.size).toBe(20);
    }
    const nan = keys.slice();
    nan[5] = NaN;
    expectError(() => createKeyIndex({ kind: 'flat', dim: 4, keys: nan }), 'ERR_VALUE', /keys/);
    const index = createKeyIndex({ kind: 'ivf', dim: 4, keys });
    expectError(() => index.search(new Float32Array(3), 2), 'ERR_SHAPE', /queries/);
    expectError(() => index.search(keys.subarray(0, 4), 0), 'ERR_OPTION', /k/);
    expectError(() => index.search(keys.subarray(0, 4), 2, { probes: 0 }), 'ERR_OPTION', /probes/);
    expectError(() => index.add(new Float32Array(5)), 'ERR_SHAPE', /keys/);
    expectError(() => pageBounds({ keys, queries: keys.subarray(0, 4), dim: 4, pageSize: 0 }), 'ERR_OPTION', /pageSize/);
    index.dispose();
    expectError(() => index.search(keys.subarray(0, 4), 2), 'ERR_DISPOSED');
  });

  it('a non-finite value is refused wherever it sits, the last element included; queries hold 1 to 1024 rows', () => {
    const random = new Random(17);
    const keys = random.tensor(10 * 4);
    for (const value of [Number.NaN, Number.POSITIVE_INFINITY]) {
      const last = keys.slice();
      last[last.length - 1] = value;
      for (const kind of ['flat', 'ivf', 'graph'] as const) {
        expectError(() => createKeyIndex({ kind, dim: 4, keys: last }), 'ERR_VALUE', /\bkeys\b.*index 39/);
        expectError(() => createKeyIndex({ kind, dim: 4, keys, queries: last.subarray(32) }), 'ERR_VALUE', /\bqueries\b.*index 7/);
        const index = createKeyIndex({ kind, dim: 4, keys });
        expectError(() => index.add(last), 'ERR_VALUE', /\bkeys\b.*index 39/);
        expect(index.size).toBe(10);
        expectError(() => index.search(last.subarray(32), 2), 'ERR_VALUE', /\bqueries\b.*index 7/);
        index.dispose();
      }
      expectError(() => pageBounds({ keys: last, queries: keys.subarray(0, 4), dim: 4 }), 'ERR_VALUE', /\bkeys\b.*index 39/);
      expectError(() => pageBounds({ keys, queries: last.subarray(32), dim: 4 }), 'ERR_VALUE', /\bqueries\b.*index 7/);
    }
    // 1024 query rows are served; none, or 1025, are refused (search and pageBounds).
    const many = random.tensor(1025 * 4);
    const index = createKeyIndex({ kind: 'flat', dim: 4, keys });
    expect(Array.from(index.search(many.subarray(0, 1024 * 4), 3).ids)).toEqual(exactTop(many.subarray(0, 1024 * 4), 4, keys, 3));
    expectError(() => index.search(many, 3), 'ERR_SHAPE', /\bqueries\b.*1025/);
    expectError(() => index.search(new Float32Array(0), 3), 'ERR_SHAPE', /\bqueries\b/);
    index.dispose();
    expect(pageBounds({ keys, queries: many.subarray(0, 1024 * 4), dim: 4, pageSize: 4 })).toHaveLength(3);
    expectError(() => pageBounds({ keys, queries: many, dim: 4 }), 'ERR_SHAPE', /\bqueries\b/);
    expectError(() => pageBounds({ keys, queries: new Float32Array(0), dim: 4 }), 'ERR_SHAPE', /\bqueries\b/);
  });
});
