// The serving section: what a server does besides attention. (1) Batched decode: one decode
// step of many sessions through KVCache.stepBatch against one step() per session, the same
// caches and tokens, interleaved runs, outputs checked identical first. (2) Parking a session:
// save() and KVCache.load() of a long cache, in GB/s of saved bytes, the loaded cache checked to
// save the same bytes. Informational: no issue sets a target here.
import { KVCache } from '../lib/index.js';
import { MODEL, QUERY_STRIDE, TOKEN_STRIDE, tokenLabel } from './cases.js';
import { ms, Table } from './report.js';
import { elapsedMs, measure, type TimeStats, type TimingPlan } from './timing.js';

const GB = 1e9;

export interface ServingPlan {
  /** Batched decode rows: sessions of `tokens` tokens each, `layers` layers per step. */
  batches: Array<{ caches: number; tokens: number }>;
  layers: number;
  timing: TimingPlan;
  /** The parked cache: layers x tokens of the bench model. */
  park: { layers: number; tokens: number; runs: number };
}

export function servingPlan(quick: boolean): ServingPlan {
  return quick
    ? { batches: [{ caches: 8, tokens: 512 }], layers: 2, timing: { warmupRuns: 1, minRuns: 5, maxRuns: 5, minTotalMs: 0 }, park: { layers: 4, tokens: 1024, runs: 3 } }
    : {
      batches: [{ caches: 32, tokens: 512 }, { caches: 32, tokens: 2048 }, { caches: 8, tokens: 8192 }], layers: 4,
      timing: { warmupRuns: 2, minRuns: 11, maxRuns: 11, minTotalMs: 0 }, park: { layers: 32, tokens: 4096, runs: 5 },
    };
}

export interface BatchRow {
  caches: number;
  tokens: number;
  layers: number;
  /** One step per session and layer, one stepBatch per layer: ms per decode step (all layers). */
  steps: TimeStats;
  batch: TimeStats;
  /** steps median / batch median. */
  speedup: number;
}

export interface ServingRecord {
  plan: ServingPlan;
  batches: BatchRow[];
  park: { bytes: number; save: TimeStats; load: TimeStats; saveGBs: number; loadGBs: number } | null;
  errors: string[];
}

export interface ServingContext {
  quick: boolean;
  say: (text?: string) => void;
  status: (text: string) => void;
}

const batchTable = new Table([
  { title: 'batched decode', width: 22, left: true }, { title: 'step() each ms', width: 14 }, { title: 'stepBatch ms', width: 12 },
  { title: 'speed-up', width: 8 },
]);

/** Deterministic values in [-1, 1) (the section needs no reference: it compares kvslim with itself). */
function values(count: number, seed: number): Float32Array {
  const out = new Float32Array(count);
  let state = seed >>> 0;
  for (let i = 0; i < count; i++) {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    out[i] = state / 2 ** 31 - 1;
  }
  return out;
}

function newCache(layers: number): KVCache {
  return new KVCache({ layers, qHeads: MODEL.qHeads, kvHeads: MODEL.kvHeads, headDim: MODEL.headDim, device: 'cpu', policy: { store: { kind: 'f16' } } });
}

function runBatch(plan: ServingPlan, caches: number, tokens: number, status: ServingContext['status']): BatchRow {
  const sessions: KVCache[] = [];
  try {
    const kv = values(tokens * TOKEN_STRIDE, tokens);
    for (let i = 0; i < caches; i++) {
      status(`serving: filling ${caches} sessions of ${tokenLabel(tokens)} tokens (${i + 1})...`);
      const cache = newCache(plan.layers);
      sessions.push(cache);
      for (let layer = 0; layer < plan.layers; layer++) cache.append(layer, kv.subarray(0, tokens * TOKEN_STRIDE), kv.subarray(0, tokens * TOKEN_STRIDE));
    }
    // Per-session forks for the step() side: both sides append the same tokens every run.
    const forks = sessions.map((cache) => cache.fork());
    sessions.push(...forks);
    const q = values(caches * QUERY_STRIDE, 7), k = values(caches * TOKEN_STRIDE, 8);
    const rowQ = (i: number) => q.subarray(i * QUERY_STRIDE, (i + 1) * QUERY_STRIDE);
    const rowK = (i: number) => k.subarray(i * TOKEN_STRIDE, (i + 1) * TOKEN_STRIDE);
    const batched = sessions.slice(0, caches);
    // Checked first: row i of the batch is session i's own step, bit for bit.
    const out = KVCache.stepBatch(batched, 0, q, k, k);
    forks.forEach((fork, i) => {
      const own = fork.step(0, rowQ(i), rowK(i), rowK(i));
      if (own.some((value, j) => !Object.is(value, out[i * QUERY_STRIDE + j]))) throw new Error(`stepBatch row ${i} differs from the session's step()`);
    });
    status(`serving: ${caches} x ${tokenLabel(tokens)}: timing step() per session against stepBatch...`);
    const stepsOnce = () => elapsedMs(() => {
      for (let layer = 0; layer < plan.layers; layer++) for (let i = 0; i < caches; i++) forks[i].step(layer, rowQ(i), rowK(i), rowK(i));
    });
    const batchOnce = () => elapsedMs(() => {
      for (let layer = 0; layer < plan.layers; layer++) KVCache.stepBatch(batched, layer, q, k, k);
    });
    // Interleaved: each timed run of one side is followed by one of the other.
    const batchSamples: number[] = [];
    const steps = measure(plan.timing, () => {
      const time = stepsOnce();
      batchSamples.push(batchOnce());
      return time;
    });
    const batchRuns = batchSamples.slice(plan.timing.warmupRuns);
    let index = 0;
    const batch = measure({ ...plan.timing, warmupRuns: 0, minRuns: batchRuns.length, maxRuns: batchRuns.length }, () => batchRuns[index++]);
    return { caches, tokens, layers: plan.layers, steps, batch, speedup: steps.medianMs / batch.medianMs };
  } finally {
    for (const cache of sessions) cache.dispose();
  }
}

function runPark(plan: ServingPlan, status: ServingContext['status']): NonNullable<ServingRecord['park']> {
  const { layers, tokens, runs } = plan.park;
  status(`serving: filling a ${layers}-layer cache of ${tokenLabel(tokens)} tokens to park...`);
  const cache = newCache(layers);
  try {
    const kv = values(tokens * TOKEN_STRIDE, 3);
    for (let layer = 0; layer < layers; layer++) cache.append(layer, kv, kv);
    let bytes = 0;
    const timing = { warmupRuns: 1, minRuns: runs, maxRuns: runs, minTotalMs: 0 };
    status(`serving: save() of the parked cache...`);
    let saved = cache.save();
    const save = measure(timing, () => elapsedMs(() => {
      saved = cache.save();
    }));
    bytes = saved.length;
    status(`serving: KVCache.load() of ${(bytes / GB).toFixed(2)} GB...`);
    const load = measure(timing, () => {
      let loaded: KVCache | null = null;
      const time = elapsedMs(() => {
        loaded = KVCache.load(saved, { device: 'cpu' });
      });
      const same = (loaded as KVCache | null)?.save().equals(saved) ?? false;
      (loaded as KVCache | null)?.dispose();
      if (!same) throw new Error('the loaded cache saves other bytes');
      return time;
    });
    return { bytes, save, load, saveGBs: bytes / (save.medianMs / 1e3) / GB, loadGBs: bytes / (load.medianMs / 1e3) / GB };
  } finally {
    cache.dispose();
  }
}

export function runServing(context: ServingContext): ServingRecord {
  const { say, status } = context;
  const plan = servingPlan(context.quick);
  const record: ServingRecord = { plan, batches: [], park: null, errors: [] };
  say();
  say(`Serving (f16 sessions of the bench model, CPU): one decode step of ${plan.layers} layers for every session, and parking a session`);
  say(batchTable.header());
  for (const { caches, tokens } of plan.batches) {
    const label = `${caches} x ${tokenLabel(tokens)} tokens`;
    try {
      const row = runBatch(plan, caches, tokens, status);
      record.batches.push(row);
      say(batchTable.line([label, ms(row.steps.medianMs), ms(row.batch.medianMs), `${row.speedup.toFixed(2)}x`]));
    } catch (error) {
      const text = `${label}: ${error instanceof Error ? error.message : String(error)}`;
      record.errors.push(text);
      say(`${label}  ERROR ${text}`);
    }
  }
  try {
    record.park = runPark(plan, status);
    const p = record.park;
    say(`park     ${plan.park.layers} layers x ${tokenLabel(plan.park.tokens)} tokens (${(p.bytes / 1e6).toFixed(0)} MB): save() ${ms(p.save.medianMs)} ms ` +
      `(${p.saveGBs.toFixed(2)} GB/s), KVCache.load() ${ms(p.load.medianMs)} ms (${p.loadGBs.toFixed(2)} GB/s)`);
  } catch (error) {
    const text = `park: ${error instanceof Error ? error.message : String(error)}`;
    record.errors.push(text);
    say(`park     ERROR ${text}`);
  }
  return record;
}

export function servingNotes(record: ServingRecord): string[] {
  return [
    `Serving: step() each = one KVCache.step per session and layer; stepBatch = one KVCache.stepBatch per layer over all sessions (each session on one thread when there are at least as many as threads); medians of ${record.plan.timing.minRuns} interleaved runs, warm caches, rows checked bit-identical first.`,
    `Serving: park = save() and KVCache.load() of one f16 cache (medians of ${record.plan.park.runs}; GB/s of saved bytes; the loaded cache saves the same bytes). saveAsync/loadAsync run the same code off the event loop.`,
  ];
}

export function servingFailures(record: ServingRecord | null): string[] {
  return record === null ? [] : record.errors;
}
