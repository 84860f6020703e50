// Float64 reference of the loading policies (policy.select quest / retrieval; methods/retrieval-attention.md):
// which positions a decode call reads per kv head, and attention over exactly those positions.
// Written from the spec: scores are max over the kv head's query group of q.k; Quest's bound of a
// page is sum_i max(q_i * min_i, q_i * max_i) over its keys' per-channel extremes.

/** Keys/values/queries of one layer as the test appended them, `[T, kvHeads, dim]` / `[n, qHeads, dim]`. */
export interface LayerData {
  keys: number[][][]; // [T][kvHeads][dim]
  values: number[][][];
}

export function dot(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let sum = 0;
  for (let i = 0; i < a.length; i++) sum += a[i] * b[i];
  return sum;
}

/** The query rows of kv head `head` in a call's q (`[n, qHeads, dim]`), ordered (position, member). */
export function groupRows(q: Float32Array, n: number, qHeads: number, kvHeads: number, head: number, dim: number): Float64Array[] {
  const group = qHeads / kvHeads;
  const rows: Float64Array[] = [];
  for (let i = 0; i < n; i++) {
    for (let g = 0; g < group; g++) {
      const base = (i * qHeads + head * group + g) * dim;
      rows.push(Float64Array.from(q.subarray(base, base + dim)));
    }
  }
  return rows;
}

/** max over the rows of q.k. */
export function groupScore(rows: Float64Array[], key: ArrayLike<number>): number {
  let best = -Infinity;
  for (const row of rows) best = Math.max(best, dot(row, key));
  return best;
}

/** Quest's upper bound of a page of keys for the query rows (max over rows). */
export function pageBound(rows: Float64Array[], page: ArrayLike<number>[]): number {
  const dim = page[0].length;
  let best = -Infinity;
  for (const row of rows) {
    let sum = 0;
    for (let d = 0; d < dim; d++) {
      let lo = Infinity;
      let hi = -Infinity;
      for (const key of page) {
        lo = Math.min(lo, key[d]);
        hi = Math.max(hi, key[d]);
      }
      sum += Math.max(row[d] * lo, row[d] * hi);
    }
    best = Math.max(best, sum);
  }
  return best;
}

/**
 * Checks that `chosen` (a set of candidates) is a top-`k` by `score` up to near-ties: it holds
 * min(k, candidates) entries, every candidate scoring above the k-th best by more than `slack` is
 * chosen, and no chosen one scores below it by more than `slack`. Returns a message or null.
 */
export function checkTopK(chosen: number[], candidates: number[], score: (c: number) => number, k: number, slack: number): string | null {
  const sorted = candidates.map((c) => score(c)).sort((a, b) => b - a);
  const count = Math.min(k, candidates.length);
  if (chosen.length !== count) return `chose ${chosen.length}, expected ${count}`;
  if (count === 0) return null;
  const kth = sorted[count - 1];
  const set = new Set(chosen);
  for (const c of candidates) if (score(c) > kth + slack && !set.has(c)) return `missed ${c} (score ${score(c)} > k-th ${kth})`;
  for (const c of chosen) if (score(c) < kth - slack) return `chose ${c} (score ${score(c)} < k-th ${kth})`;
  return null;
}

/**
 * Attention of a call's queries over given positions per kv head (float64, `[n, qHeads, dim]`).
 * Query i of n sits at position T - n + i and sees positions <= its own among `positions[kvHead]`.
 */
export function attentionOver(q: Float32Array, n: number, qHeads: number, kvHeads: number, dim: number, data: LayerData,
  positions: number[][], scale = 1 / Math.sqrt(dim)): Float64Array {
  const group = qHeads / kvHeads;
  const T = data.keys.length;
  const out = new Float64Array(n * qHeads * dim);
  for (let i = 0; i < n; i++) {
    for (let h = 0; h < qHeads; h++) {
      const head = Math.floor(h / group);
      const qRow = q.subarray((i * qHeads + h) * dim, (i * qHeads + h + 1) * dim);
      const visible = positions[head].filter((p) => p <= T - n + i);
      const logits = visible.map((p) => dot(qRow, data.keys[p][head]) * scale);
      const max = Math.max(...logits);
      const weights = logits.map((l) => Math.exp(l - max));
      const total = weights.reduce((a, b) => a + b, 0);
      for (let j = 0; j < visible.length; j++) {
        const value = data.values[visible[j]][head];
        for (let d = 0; d < dim; d++) out[(i * qHeads + h) * dim + d] += (weights[j] / total) * value[d];
      }
    }
  }
  return out;
}
