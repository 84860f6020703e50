// The evaluation runner (SCBench-style, the scbench method spec (methods/scbench.md)): one shared context, several
// query turns, every policy. For each policy the context is built once (appended, its last
// `observedTokens` prefilled so query-aware policies see queries), then each turn's query tokens are
// decoded one step at a time. Multi-turn: the turns extend one cache. Multi-request: each turn runs on
// a fork of the context cache, which stays unchanged. Outputs are compared with exact attention
// computed by the stateless attention() on the same f32 data (the reference is computed once per
// mode and shared by all policies).
import { attention } from '../attention.js';
import { backends } from '../backends.js';
import { KVCache } from '../cache.js';
import { describe, KVSlimError } from '../errors.js';
import { type PolicySpec, resolvePolicy } from '../policy.js';
import type { Trace } from '../trace/trace.js';
import {
  argmax, attentionProbabilities, massRecall, needleHit, outputFidelity, summarize, topkRecall,
} from './metrics.js';
import { type Report, REPORT_SCHEMA, policyName, summarizeTurns, type TurnReport } from './report.js';
import { type EvalSource, generateWorkload, WORKLOADS } from './workload.js';

/** Options of {@link evaluate}. */
export interface EvaluateOptions {
  /** A built-in workload name (`needles-4k`, `needles-32k`), a decoded trace, or a prepared source. */
  source: string | Trace | EvalSource;
  /** Policies to compare (default: `[{}]`, the full f16 cache). */
  policies?: PolicySpec[];
  /** `multi-turn` (default): turns extend one cache; `multi-request`: each turn forks the context. */
  mode?: 'multi-turn' | 'multi-request';
  /** Query turns to run (default: all the source holds). */
  turns?: number;
  /** Seed of a built-in workload (default: the workload's own). */
  seed?: number;
  /** Where caches live (default `cpu`: the exact reference runs there too). */
  device?: 'cpu' | 'cuda';
  /** Called as work progresses (for a progress line). */
  onProgress?: (event: { policy: string; stage: 'source' | 'reference' | 'prefill' | 'turn'; turn: number; turns: number }) => void;
}

/** Context rows of a trace prefilled with their queries; the rest are appended. */
const TRACE_OBSERVED_TOKENS = 64;

/**
 * A trace as an evaluation source: rows after `meta.promptTokens` (when the trace records it) are
 * the query tokens, split into `turns` turns; otherwise the last `turns` rows are one query each.
 * Traces have no needles, so needle measures are null.
 */
export function traceSource(trace: Trace, turns?: number): EvalSource {
  const { config, tokens } = trace.meta;
  const rows = tokens.length;
  const prompt = typeof trace.meta.promptTokens === 'number' && trace.meta.promptTokens < rows ? trace.meta.promptTokens : null;
  const queryRows = prompt === null ? Math.min(turns ?? 1, rows - 1) : rows - prompt;
  const turnCount = Math.min(turns ?? queryRows, queryRows);
  if (turnCount < 1 || rows - queryRows < 1) throw new KVSlimError('ERR_SHAPE', `The trace has ${rows} rows: too few for a context and ${turns ?? 1} turn(s)`);
  const contextTokens = rows - queryRows;
  const perTurn = Math.floor(queryRows / turnCount);
  const observedTokens = Math.min(TRACE_OBSERVED_TOKENS, contextTokens);
  const qRow = config.qHeads * config.headDim, kvRow = config.kvHeads * config.headDim;
  const slice = (data: Float32Array, row: number, from: number, to: number) => data.subarray(from * row, to * row);
  return {
    name: typeof config.model === 'string' ? `trace:${config.model}` : 'trace',
    config: { layers: config.layers, qHeads: config.qHeads, kvHeads: config.kvHeads, headDim: config.headDim },
    contextTokens,
    context: trace.layers.map((l) => ({ k: slice(l.k, kvRow, 0, contextTokens), v: slice(l.v, kvRow, 0, contextTokens) })),
    observed: trace.layers.map((l) => slice(l.q, qRow, contextTokens - observedTokens, contextTokens)),
    observedTokens,
    turns: Array.from({ length: turnCount }, (_, turn) => {
      const from = contextTokens + turn * perTurn, to = from + perTurn;
      return {
        layers: trace.layers.map((l) => ({ q: slice(l.q, qRow, from, to), k: slice(l.k, kvRow, from, to), v: slice(l.v, kvRow, from, to) })),
        needles: new Array<number | null>(perTurn).fill(null),
      };
    }),
    seed: null,
  };
}

function resolveSource(source: EvaluateOptions['source'], turns: number | undefined, seed: number | undefined): EvalSource {
  if (typeof source === 'string') return generateWorkload(source, seed);
  if (typeof source === 'object' && source !== null && 'layers' in source && 'meta' in source) return traceSource(source, turns);
  if (typeof source === 'object' && source !== null && 'context' in source && 'turns' in source) return source;
  throw new KVSlimError('ERR_OPTION', `Expected a workload name (${Object.keys(WORKLOADS).join(', ')}), a trace or an evaluation source for source but received ${describe(source)}`);
}

/** Exact outputs and needle facts of one turn (shared by every policy). */
interface TurnReference {
  /** Per layer: exact attention output `[n, qHeads, headDim]`. */
  outputs: Float32Array[];
  /** Keys a turn's tokens see: rows of the laid-out sequence. */
  tokens: number;
  needleHitRate: number | null;
  needleArgmaxRate: number | null;
  /** Per layer, per query head: exact attention probabilities of the turn's last query. */
  lastProbs: Float64Array[][];
}

/** Positions of the turn's tokens in the laid-out sequence: multi-turn appends, multi-request restarts after the context. */
function turnOffsets(source: EvalSource, turns: number, mode: 'multi-turn' | 'multi-request'): number[] {
  let offset = source.contextTokens;
  return source.turns.slice(0, turns).map((turn) => {
    const start = mode === 'multi-turn' ? offset : source.contextTokens;
    offset += turn.needles.length;
    return start;
  });
}

/** Needle hit rate of outputs (per layer `[n, qHeads, headDim]`) over needle-asking rows x heads x layers. */
function needleRate(source: EvalSource, turn: number, outputs: Float32Array[], values: Float32Array[]): number | null {
  const { qHeads, kvHeads, headDim } = source.config;
  const group = qHeads / kvHeads;
  let hits = 0, asked = 0;
  source.turns[turn].needles.forEach((position, row) => {
    if (position === null) return;
    outputs.forEach((out, layer) => {
      for (let head = 0; head < qHeads; head++) {
        const valueBase = (position * kvHeads + Math.floor(head / group)) * headDim;
        const outBase = (row * qHeads + head) * headDim;
        asked++;
        if (needleHit(out.subarray(outBase, outBase + headDim), values[layer].subarray(valueBase, valueBase + headDim))) hits++;
      }
    });
  });
  return asked === 0 ? null : hits / asked;
}

function references(source: EvalSource, turns: number, mode: 'multi-turn' | 'multi-request', device: 'cpu' | 'cuda'): TurnReference[] {
  const { layers, qHeads, kvHeads, headDim } = source.config;
  const kvRow = kvHeads * headDim;
  const offsets = turnOffsets(source, turns, mode);
  const capacity = Math.max(...offsets.map((o, i) => o + source.turns[i].needles.length));
  // The whole sequence per layer: context, then the turns laid out as the mode places them.
  const sequence = source.context.map(({ k, v }) => {
    const keys = new Float32Array(capacity * kvRow), values = new Float32Array(capacity * kvRow);
    keys.set(k);
    values.set(v);
    return { keys, values };
  });
  const scale = 1 / Math.sqrt(headDim);
  const group = qHeads / kvHeads;
  return offsets.map((offset, turn) => {
    const { layers: turnLayers, needles } = source.turns[turn];
    const tokens = offset + needles.length;
    const outputs = turnLayers.map((data, layer) => {
      sequence[layer].keys.set(data.k, offset * kvRow);
      sequence[layer].values.set(data.v, offset * kvRow);
      return attention({
        q: data.q, k: sequence[layer].keys.subarray(0, tokens * kvRow), v: sequence[layer].values.subarray(0, tokens * kvRow),
        qHeads, kvHeads, headDim, causal: true, device,
      });
    });
    // The needle's key must be the top score of its query (every q head, every layer).
    let top = 0, asked = 0;
    needles.forEach((position, row) => {
      if (position === null) return;
      for (let layer = 0; layer < layers; layer++) {
        for (let head = 0; head < qHeads; head++) {
          const probs = attentionProbabilities(turnLayers[layer].q, (row * qHeads + head) * headDim, sequence[layer].keys, kvHeads, Math.floor(head / group), headDim, offset + row + 1, scale);
          asked++;
          if (argmax(probs) === position) top++;
        }
      }
    });
    const last = needles.length - 1;
    const lastProbs = last < 0 ? [] : turnLayers.map((data, layer) => Array.from({ length: qHeads }, (_, head) =>
      attentionProbabilities(data.q, (last * qHeads + head) * headDim, sequence[layer].keys, kvHeads, Math.floor(head / group), headDim, offset + last + 1, scale)));
    return {
      outputs, tokens, lastProbs,
      needleHitRate: needleRate(source, turn, outputs, sequence.map((s) => s.values)),
      needleArgmaxRate: asked === 0 ? null : top / asked,
    };
  });
}

/**
 * Mean attention-mass and top-k recall of the tokens the last call read (per layer, query head; per
 * kv head): the kept tokens, or what a loading policy loaded.
 */
function keptRecall(cache: KVCache, probs: Float64Array[][], kvHeads: number): { attnMassRecallMean: number; topkRecallMean: number } {
  let mass = 0, topk = 0, count = 0;
  probs.forEach((heads, layer) => {
    const group = heads.length / kvHeads;
    for (let kvHead = 0; kvHead < kvHeads; kvHead++) {
      const kept = cache.loadedPositions(layer, kvHead);
      // A cache that keeps every token needs no set.
      const set = kept.length >= heads[0].length ? null : new Set(kept);
      for (let g = 0; g < group; g++) {
        const p = heads[kvHead * group + g];
        mass += massRecall(p, set);
        topk += topkRecall(p, set);
        count++;
      }
    }
  });
  return { attnMassRecallMean: count === 0 ? 1 : mass / count, topkRecallMean: count === 0 ? 1 : topk / count };
}

/** The report's `engine` (keep in step with package.json's version). */
const ENGINE = 'kvslim@0.1.0';

/** ERR_OPTION unless `turns` (undefined: all) is an integer in [1, holds]. */
function checkTurns(turns: unknown, holds: number, name: string): void {
  if (turns !== undefined && !(Number.isInteger(turns) && (turns as number) >= 1 && (turns as number) <= holds)) {
    throw new KVSlimError('ERR_OPTION', `Expected turns to be an integer in [1, ${holds}] (the turns ${name} holds) but received ${describe(turns)}`);
  }
}

function deviceName(device: 'cpu' | 'cuda'): string {
  const found = backends();
  if (device === 'cuda' && found.cuda !== null) return `cuda ${found.cuda.name}`;
  return `cpu ${found.cpu.simd} x${found.cpu.threads}`;
}

/**
 * Runs every policy over the source's shared context and query turns and reports memory, stage
 * times and fidelity per turn (one {@link Report} per policy, schema `scbench-report/1`).
 * Throws `ERR_OPTION` for an unknown workload, a bad mode or turn count, or a policy this version
 * does not implement (before any work is done).
 */
export function evaluate(options: EvaluateOptions): Report[] {
  if (typeof options !== 'object' || options === null) throw new KVSlimError('ERR_OPTION', `Expected an options object for evaluate but received ${describe(options)}`);
  const mode = options.mode ?? 'multi-turn';
  if (mode !== 'multi-turn' && mode !== 'multi-request') throw new KVSlimError('ERR_OPTION', `Expected 'multi-turn' or 'multi-request' for mode but received ${describe(mode)}`);
  const device = options.device ?? 'cpu';
  if (device !== 'cpu' && device !== 'cuda') throw new KVSlimError('ERR_OPTION', `Expected 'cpu' or 'cuda' for device but received ${describe(device)}`);
  if (options.policies !== undefined && !Array.isArray(options.policies)) {
    throw new KVSlimError('ERR_OPTION', `Expected an array of policies but received ${describe(options.policies)}`);
  }
  const policies = (options.policies ?? [{}]).map((spec) => ({ spec, resolved: resolvePolicy(spec) }));
  if (policies.length === 0) throw new KVSlimError('ERR_OPTION', 'Expected at least one policy');
  // A workload's turn count is known before its (long) generation: reject a bad --turns first.
  if (typeof options.source === 'string' && Object.hasOwn(WORKLOADS, options.source)) checkTurns(options.turns, WORKLOADS[options.source].turns, options.source);
  const progress = options.onProgress ?? (() => undefined);
  progress({ policy: 'exact', stage: 'source', turn: 0, turns: options.turns ?? 0 });
  const source = resolveSource(options.source, options.turns, options.seed);
  checkTurns(options.turns, source.turns.length, source.name);
  const turns = options.turns ?? source.turns.length;
  const { layers, qHeads, kvHeads, headDim } = source.config;
  const kvRow = kvHeads * headDim, qRow = qHeads * headDim;

  progress({ policy: 'exact', stage: 'reference', turn: 0, turns });
  const reference = references(source, turns, mode, device);
  const deviceText = deviceName(device);

  return policies.map(({ spec, resolved }) => {
    const name = policyName(resolved);
    progress({ policy: name, stage: 'prefill', turn: 0, turns });
    const cache = new KVCache({ layers, qHeads, kvHeads, headDim, device, policy: spec });
    const turnReports: TurnReport[] = [];
    try {
      const started = performance.now();
      const appended = source.contextTokens - source.observedTokens;
      for (let layer = 0; layer < layers; layer++) {
        const { k, v } = source.context[layer];
        if (appended > 0) cache.append(layer, k.subarray(0, appended * kvRow), v.subarray(0, appended * kvRow));
        if (source.observedTokens > 0) cache.prefill(layer, source.observed[layer], k.subarray(appended * kvRow), v.subarray(appended * kvRow));
      }
      const prefillMs = performance.now() - started;

      for (let turn = 0; turn < turns; turn++) {
        progress({ policy: name, stage: 'turn', turn: turn + 1, turns });
        const target = mode === 'multi-turn' ? cache : cache.fork();
        try {
          const before = target.stats().timeMs;
          const { layers: data, needles } = source.turns[turn];
          const n = needles.length;
          const outputs = data.map(() => new Float32Array(n * qRow));
          const stepMs: number[] = [];
          for (let row = 0; row < n; row++) {
            const stepStart = performance.now();
            for (let layer = 0; layer < layers; layer++) {
              const { q, k, v } = data[layer];
              target.step(layer, q.subarray(row * qRow, (row + 1) * qRow), k.subarray(row * kvRow, (row + 1) * kvRow), v.subarray(row * kvRow, (row + 1) * kvRow), {
                out: outputs[layer].subarray(row * qRow, (row + 1) * qRow),
              });
            }
            stepMs.push(performance.now() - stepStart);
          }
          const stats = target.stats();
          const ref = reference[turn];
          const fidelity = outputs.map((out, layer) => outputFidelity(out, ref.outputs[layer], headDim));
          const steps = summarize(stepMs);
          const held = stats.bytes.kv + stats.bytes.residual;
          turnReports.push({
            turn: turn + 1,
            queryTokens: n,
            genTokens: n,
            memory: {
              kvBytesFull: stats.bytes.fullF16,
              kvBytesDevice: target.device === 'cuda' ? held : 0,
              kvBytesHost: target.device === 'cuda' ? 0 : held,
              indexBytes: stats.bytes.index,
              summaryBytes: stats.bytes.summary,
              metaBytes: stats.bytes.meta,
              peakDeviceBytes: target.device === 'cuda' ? stats.bytes.allocated : 0,
              retainedTokens: stats.tokens.kept,
              retainedRatio: stats.tokens.seen > 0 ? stats.tokens.kept / stats.tokens.seen : 0,
              compressionRatio: stats.compressionRatio,
            },
            latencyMs: {
              prefill: turn === 0 ? prefillMs : 0,
              indexBuild: stats.timeMs.indexBuild - before.indexBuild,
              compress: stats.timeMs.compress - before.compress,
              cacheLoad: 0,
              decodeTotal: stepMs.reduce((a, b) => a + b, 0),
              decodePerTokenMean: steps.mean,
              decodePerTokenP50: steps.p50,
              decodePerTokenP99: steps.p99,
              retrievalPerStepMean: n > 0 ? (stats.timeMs.retrieve - before.retrieve) / n : 0,
            },
            fidelity: {
              taskScore: needleRate(source, turn, outputs, source.context.map((c) => c.v)),
              taskScoreFull: ref.needleHitRate,
              greedyTokenAgreement: null,
              logitKLMean: null,
              attnOutCosineMean: fidelity.reduce((sum, f) => sum + f.cosineMean, 0) / layers,
              attnOutRelL2Mean: fidelity.reduce((sum, f) => sum + f.relL2Mean, 0) / layers,
              // Of the turn's last query, over the tokens each kv head keeps after the turn.
              ...keptRecall(target, ref.lastProbs, kvHeads),
              needleArgmaxRate: ref.needleArgmaxRate,
            },
          });
        } finally {
          if (target !== cache) target.dispose();
        }
      }
    } finally {
      cache.dispose();
    }
    return {
      schema: REPORT_SCHEMA,
      engine: ENGINE,
      device: deviceText,
      model: { name: source.name, layers, qHeads, kvHeads, headDim, kvDtype: resolved.store.kind },
      method: {
        name, params: spec,
        stage: ['quest', 'retrieval', 'actqkv'].includes(resolved.select.kind) ? 'loading'
          : resolved.store.kind === 'kivi' || ['streaming', 'snapkv', 'pyramidkv', 'h2o', 'duo'].includes(resolved.select.kind) ? 'compression' : 'none',
        kvClass: ['streaming', 'snapkv', 'pyramidkv', 'h2o'].includes(resolved.select.kind) ? 'O(k)' : 'O(n)',
      },
      mode,
      task: source.name,
      sessionId: source.seed === null ? source.name : `${source.name}#seed${source.seed}`,
      contextTokens: source.contextTokens,
      turns: turnReports,
      summary: summarizeTurns(turnReports),
    };
  });
}
