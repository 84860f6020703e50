// `npm run bench`: decode and causal-prefill attention of one Llama-3-8B layer, each case checked
// against a plain-JS reference before it is timed, each figure printed beside the machine limit
// measured in the same run (DESIGN.md, Performance model) and beside the plain-JS peer.
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import os from 'node:os';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { type Backends, backends, type MachineLimits, probeMachine } from '../lib/index.js';
import { attentionPlainJS } from './baseline.js';
import {
  APPEND_CHUNK_TOKENS, type CaseKind, type CaseRun, type CaseSpec, declareMatrix, kvBytes, MODEL, prefillFlops,
  QUERY_STRIDE, runDecode, runPrefill, TOKEN_STRIDE, tokenLabel, TOLERANCE,
} from './cases.js';
import { gridValues } from './data.js';
import { headsFailures, headsNotes, type HeadsRecord, headsTargets, runHeads } from './heads.js';
import { kiviAboveLimit, kiviFailures, kiviNotes, kiviPlan, type KiviRecord, kiviTargets, runKivi } from './kivi.js';
import { policiesFailures, policiesNotes, type PoliciesRecord, policiesTargets, runPolicies } from './policies.js';
import { retrievalFailures, retrievalNotes, type RetrievalRecord, retrievalTargets, runRetrieval } from './retrieval.js';
import { runServing, servingFailures, servingNotes, type ServingRecord } from './serving.js';
import {
  type BaselineResult, baselineLine, type CaseResult, caseLine, decodeTable, prefillTable, type TargetResult,
  targetLines, writeJson,
} from './report.js';
import { EVICT_BYTES, measure, type TimingPlan, elapsedMs } from './timing.js';

const USAGE = `Usage: npm run bench [-- options]     (or: node dist/bench/main.js [options] after tsc)

Decode attention of a Llama-3-8B layer (32 q heads, 8 kv heads, headDim 128) at 4K, 16K and 64K
tokens over f32, f16 and bf16 KV, and causal prefill at 4K; each case checked against a plain-JS
reference, then timed and compared with the machine's measured bandwidth / FMA peak and with the
plain-JS baseline. Then KIVI-8/4/2 decode at 4K-64K beside the f16 cache (bytes read, bandwidth,
speed-up, compression) and KIVI quality on keys with outlier channels (output error, needle hit
rate, keys-per-token ablation). Then the selection policies (streaming, snapkv, pyramidkv, duo) on a
32K needle prompt at budgets T/4-T/16: bytes kept, decode time, output error, attention mass and
needle hits for the question's turn and a second turn, plus a 2K whole-prompt prefill (with h2o)
timing what selection adds. Then head scoring: scoreHeads on a 32K workload whose kv heads half attend
locally and half retrieve needles, and a DuoAttention cache driven by the scores (kept tokens vs the
truth, needle hits, output error of the streamed heads, decode time). Then retrieval
(RetrievalAttention): recall@100, keys scanned and latency of the flat / ivf / graph key indexes
beside Quest and hnswlib on 64K and 256K keys of one kv head, and decode with each of them and
ActQKV at 64K and 256K over 4 needle turns (speed-up vs the full f16 cache, output error, needle
hits). Then serving (stepBatch, parking sessions). A full run
takes 12-17 minutes on 2 cores: the decode and prefill cases about 4, KIVI 2-3, policies 3-5 (two
32K-token prefills per cache for H2O), heads under 1, retrieval 5-6 (its index builds dominate).

Options:
  --quick            decode at 4K, a 1K prefill, KIVI at 4K only, policies at 4K/1K, heads at 4K, retrieval at 16K (smoke test)
  --only <kind>      decode | prefill | kivi | policies | heads | retrieval | serving: run one part
  --case <id>[,...]  run only these cases (repeatable), e.g. --case decode-f16-64K (no KIVI, policies, heads or retrieval section)
  --list             print the case ids of the matrix and exit
  --json <path>      write the JSON record there instead of bench/results/
  -h, --help         print this help

Results: a complete run writes bench/results/<cpu|cuda>-<stamp>.json and bench/results/latest.json;
a partial run (--quick, --only, --case) writes bench/results/<cpu|cuda>-<stamp>.tmp.json (git-ignored)
and leaves latest.json alone. Exit status 1 when a case fails its check or throws.
Environment: KVSLIM_THREADS (pool size), KVSLIM_SIMD (force a lower SIMD level) apply as usual.`;

class UsageError extends Error {}

interface Args {
  quick: boolean;
  only: CaseKind | 'kivi' | 'policies' | 'heads' | 'retrieval' | 'serving' | null;
  cases: string[];
  json: string | null;
  list: boolean;
  help: boolean;
}

function parseArgs(argv: string[]): Args {
  const args: Args = { quick: false, only: null, cases: [], json: null, list: false, help: false };
  for (let i = 0; i < argv.length; i++) {
    const [flag, inline] = argv[i].startsWith('--') && argv[i].includes('=') ? argv[i].split(/=(.*)/s) : [argv[i], undefined];
    const value = (): string => {
      const given = inline ?? argv[++i];
      if (given === undefined || given === '') throw new UsageError(`${flag} needs a value`);
      return given;
    };
    switch (flag) {
      case '--quick': args.quick = true; break;
      case '--only': {
        const kind = value();
        if (kind !== 'decode' && kind !== 'prefill' && kind !== 'kivi' && kind !== 'policies' && kind !== 'heads' && kind !== 'retrieval' && kind !== 'serving') {
          throw new UsageError(`--only takes decode, prefill, kivi, policies, heads, retrieval or serving, not '${kind}'`);
        }
        args.only = kind;
        break;
      }
      case '--case': args.cases.push(...value().split(',').filter((id) => id !== '')); break;
      case '--json': args.json = value(); break;
      case '--list': args.list = true; break;
      case '-h': case '--help': args.help = true; break;
      default: throw new UsageError(`Unknown option '${argv[i]}'`);
    }
  }
  return args;
}

/** Status line on a terminal's stderr, replaced by the next one and cleared before table output. */
let statusShown = false;
function status(text: string): void {
  if (!process.stderr.isTTY) return;
  process.stderr.write(`\r\x1b[K${text}`);
  statusShown = true;
}
function say(text = ''): void {
  if (statusShown) {
    process.stderr.write('\r\x1b[K');
    statusShown = false;
  }
  process.stdout.write(`${text}\n`);
}

/** A path relative to the working directory when it lies inside it. */
function shortPath(path: string): string {
  const short = relative(process.cwd(), path);
  return short.startsWith('..') ? path : short;
}

function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'package.json'))) {
    const parent = dirname(dir);
    if (parent === dir) return process.cwd();
    dir = parent;
  }
  return dir;
}

function gitState(root: string): { commit: string | null; dirty: boolean | null } {
  const git = (...args: string[]) => execFileSync('git', args, { cwd: root, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  try {
    return { commit: git('rev-parse', 'HEAD'), dirty: git('status', '--porcelain', '--untracked-files=no') !== '' };
  } catch {
    return { commit: null, dirty: null };
  }
}

function describeBackends(info: Backends): string {
  const cpu = info.cpu;
  const simd = `${cpu.simd}${cpu.forced ? ` (forced by KVSLIM_SIMD=${cpu.forced})` : ''}, avx2 ${cpu.avx2 ? 'yes' : 'no'}, avx512 ${cpu.avx512 ? 'yes' : 'no'}`;
  const cuda = info.cuda === null ? 'not built'
    : info.cuda.available ? `${info.cuda.name} (compute ${info.cuda.computeCapability}, ${info.cuda.devices} device(s))`
      : `unavailable (${info.cuda.reason})`;
  return `cpu ${simd}, ${cpu.threads} threads, prefetch into ${cpu.prefetch.toUpperCase()}; cuda ${cuda}`;
}

const GB = 1e9;
const GiB = 1024 ** 3;
/** Probe drift (before vs after the cases) above which the run warns that its fractions are uncertain. */
const DRIFT_WARNING = 0.15;

const TARGETS: Array<{ name: string; caseId: string; metric: 'bandwidthFraction' | 'speedup' | 'peakFraction'; target: number }> = [
  { name: 'decode f16 64K: K+V read, fraction of measured bandwidth', caseId: 'decode-f16-64K', metric: 'bandwidthFraction', target: 0.85 },
  { name: 'decode f32 64K: K+V read, fraction of measured bandwidth', caseId: 'decode-f32-64K', metric: 'bandwidthFraction', target: 0.85 },
  { name: 'decode f16 64K: speed-up over plain JS', caseId: 'decode-f16-64K', metric: 'speedup', target: 20 },
  { name: 'decode f32 64K: speed-up over plain JS', caseId: 'decode-f32-64K', metric: 'speedup', target: 20 },
  { name: 'decode bf16 64K: speed-up over plain JS', caseId: 'decode-bf16-64K', metric: 'speedup', target: 20 },
  { name: 'prefill f16 4K causal: fraction of measured FMA peak', caseId: 'prefill-f16-4K', metric: 'peakFraction', target: 0.5 },
  { name: 'prefill f32 4K causal: fraction of measured FMA peak', caseId: 'prefill-f32-4K', metric: 'peakFraction', target: 0.5 },
];

async function main(): Promise<void> {
  const startedAt = Date.now();
  const argv = process.argv.slice(2);
  const args = parseArgs(argv);
  if (args.help) {
    say(USAGE);
    return;
  }
  const info = backends();
  const cuda = info.cuda?.available === true;
  const matrix = declareMatrix({ quick: args.quick, cuda });
  if (args.list) {
    for (const spec of matrix.cases) say(spec.id);
    return;
  }
  const unknown = args.cases.filter((id) => !matrix.cases.some((spec) => spec.id === id));
  if (unknown.length > 0) {
    throw new UsageError(`Unknown case ${unknown.join(', ')}; this matrix${args.quick ? ' (--quick)' : ''} has: ${matrix.cases.map((s) => s.id).join(', ')}`);
  }
  const selected = matrix.cases.filter((spec) =>
    (args.only === null || spec.kind === args.only) && (args.cases.length === 0 || args.cases.includes(spec.id)));
  // The KIVI section has no case ids: it runs in full runs and with --only kivi, not with --case.
  const runsKivi = args.cases.length === 0 && (args.only === null || args.only === 'kivi');
  const runsPolicies = args.cases.length === 0 && (args.only === null || args.only === 'policies');
  const runsHeads = args.cases.length === 0 && (args.only === null || args.only === 'heads');
  const runsRetrieval = args.cases.length === 0 && (args.only === null || args.only === 'retrieval');
  const runsServing = args.cases.length === 0 && (args.only === null || args.only === 'serving');
  const complete = !args.quick && args.only === null && args.cases.length === 0;
  const command = `npm run bench${argv.length > 0 ? ` -- ${argv.join(' ')}` : ''}`;
  const reproduce = (id: string) => `npm run bench -- ${args.quick ? '--quick ' : ''}--case ${id}`;

  // Machine limits first: every figure below is judged against them.
  say(`kvslim bench: attention of one ${MODEL.name} layer (${MODEL.qHeads} q heads, ${MODEL.kvHeads} kv heads, headDim ${MODEL.headDim})`);
  const cpus = os.cpus();
  say(`machine  ${cpus[0]?.model.trim() ?? 'unknown CPU'}, ${cpus.length} cores, ${(os.totalmem() / GiB).toFixed(1)} GiB, ${os.platform()} ${os.arch()}, node ${process.version}`);
  say(`kvslim   ${describeBackends(info)}`);
  const probe = args.quick ? { bufferMiB: 256, repeats: 3 } : { bufferMiB: 1024, repeats: 5 };
  status(`probing read bandwidth (${probe.bufferMiB} MiB) and FMA peak...`);
  let limits: MachineLimits = { readBytesPerSecond: 0, fmaFlopsPerSecond: 0, threads: 0 };
  const probeMs = elapsedMs(() => {
    limits = probeMachine(probe);
  });
  say(`limits   read bandwidth ${(limits.readBytesPerSecond / GB).toFixed(1)} GB/s, f32 FMA peak ${(limits.fmaFlopsPerSecond / GB).toFixed(1)} GFLOP/s` +
    `  (probeMachine now: ${limits.threads} threads, ${probe.bufferMiB} MiB buffer, best of ${probe.repeats})`);

  // One data set for every case: the first T tokens of the same K and V.
  const maxTokens = Math.max(
    0, ...selected.map((spec) => spec.tokens), selected.some((s) => s.kind === 'prefill') ? matrix.jsPrefillTokens : 0,
    ...(runsKivi ? kiviPlan(args.quick).timingTokens : []),
  );
  status(`generating K and V for ${maxTokens} tokens...`);
  const k = gridValues(maxTokens * TOKEN_STRIDE, 1);
  const v = gridValues(maxTokens * TOKEN_STRIDE, 2);

  const results: CaseResult[] = [];
  const baselines: BaselineResult[] = [];
  const record = (spec: CaseSpec, derive: () => CaseRun, finish: (result: CaseResult) => void): void => {
    const result: CaseResult = { ...spec, queries: spec.kind === 'decode' ? spec.queries ?? 1 : spec.tokens, status: 'ok', reproduce: reproduce(spec.id) };
    try {
      const run = derive();
      Object.assign(result, { check: run.check, time: run.time, fillMs: run.fillMs });
      if (!run.check.passed) result.status = 'FAILED';
      else finish(result);
    } catch (error) {
      result.status = 'ERROR';
      result.error = (error instanceof Error ? `${error.name}: ${error.message}` : String(error)).split('\n')[0];
    }
    results.push(result);
    say(caseLine(result));
  };

  const decodePlan: TimingPlan = args.quick
    ? { warmupRuns: 2, minRuns: 10, maxRuns: 40, minTotalMs: 100 }
    : { warmupRuns: 2, minRuns: 15, maxRuns: 150, minTotalMs: 250 };
  const baselinePlan: TimingPlan = { warmupRuns: 0, minRuns: 3, maxRuns: 3, minTotalMs: 0 };
  const prefillPlan = (checkMs: number): TimingPlan => ({ warmupRuns: 0, minRuns: checkMs > 2000 ? 3 : 5, maxRuns: 30, minTotalMs: 1000 });

  // The plain-JS peer, JIT-warmed on a small problem before it is timed.
  const jsProblem = (q: Float32Array, tokens: number, positions: number[]) => ({
    q, k: k.subarray(0, tokens * TOKEN_STRIDE), v: v.subarray(0, tokens * TOKEN_STRIDE),
    qHeads: MODEL.qHeads, kvHeads: MODEL.kvHeads, headDim: MODEL.headDim, positions,
  });
  let jsWarm = false;
  const warmJS = () => {
    if (jsWarm) return;
    const tokens = Math.min(64, maxTokens);
    const q = gridValues(tokens * QUERY_STRIDE, 9);
    for (let i = 0; i < 3; i++) attentionPlainJS(jsProblem(q, tokens, Array.from({ length: tokens }, (_, p) => p)));
    jsWarm = true;
  };

  const decodeCases = selected.filter((spec) => spec.kind === 'decode');
  if (decodeCases.length > 0) {
    say();
    say('Decode: one query (x5: five at once, a speculative step) attends to all T cached tokens; the step reads every K and V byte once.');
    say(decodeTable.header());
    // One plain-JS run per T (and query count), shared by the stores (and devices) of that T: its
    // K/V are f32 either way.
    const decodeBaselines = new Map<string, { q: Float32Array; reference: Float32Array; result: BaselineResult }>();
    for (const spec of decodeCases) {
      const queries = spec.queries ?? 1;
      const peerKey = `${spec.tokens}x${queries}`;
      let peer = decodeBaselines.get(peerKey);
      if (peer === undefined) {
        const q = gridValues(queries * QUERY_STRIDE, 1000 + spec.tokens);
        status(`plain-JS decode of ${queries} queries at ${tokenLabel(spec.tokens)} tokens...`);
        warmJS();
        let reference: Float32Array = new Float32Array(0);
        const problem = jsProblem(q, spec.tokens, Array.from({ length: queries }, (_, i) => spec.tokens - queries + i));
        const time = measure(baselinePlan, () => elapsedMs(() => {
          reference = attentionPlainJS(problem);
        }));
        const bytesRead = spec.tokens * TOKEN_STRIDE * 2 * 4;
        const gbPerSecond = bytesRead / (time.medianMs * 1e6);
        const result: BaselineResult = {
          id: `js-decode-${tokenLabel(spec.tokens)}${queries > 1 ? `-x${queries}` : ''}`, kind: 'decode', tokens: spec.tokens, queries, reads: 'f32', time,
          bytesRead, gbPerSecond, bandwidthFraction: (gbPerSecond * GB) / limits.readBytesPerSecond,
          sharedBy: decodeCases.filter((s) => s.tokens === spec.tokens && (s.queries ?? 1) === queries).map((s) => s.id),
        };
        baselines.push(result);
        say(baselineLine(result));
        peer = { q, reference, result };
        decodeBaselines.set(peerKey, peer);
      }
      const { q, reference, result: js } = peer;
      status(`${spec.id}: appending ${spec.tokens} tokens, checking, timing...`);
      record(spec, () => runDecode(spec, { k, v, q, reference }, decodePlan), (result) => {
        const medianMs = result.time?.medianMs ?? NaN;
        result.bytesRead = kvBytes(spec);
        result.gbPerSecond = result.bytesRead / (medianMs * 1e6);
        result.bandwidthFraction = spec.device === 'cpu' ? (result.gbPerSecond * GB) / limits.readBytesPerSecond : null;
        result.baseline = { id: js.id, tokens: js.tokens, medianMs: js.time.medianMs };
        result.speedup = js.time.medianMs / medianMs;
        result.speedupBasis = `time of the plain-JS decode at the same T and query count (single thread, f32 K/V)`;
      });
    }
  }

  const prefillCases = selected.filter((spec) => spec.kind === 'prefill');
  if (prefillCases.length > 0) {
    say();
    say(`Prefill: T queries attend causally to T tokens (fresh cache per run); FLOPs = 4 x qHeads x headDim x T(T+1)/2.`);
    say(prefillTable.header());
    const q = gridValues(Math.max(...prefillCases.map((s) => s.tokens), matrix.jsPrefillTokens) * QUERY_STRIDE, 3);
    const jsTokens = matrix.jsPrefillTokens;
    status(`plain-JS causal prefill at ${jsTokens} tokens...`);
    warmJS();
    let jsOutput: Float32Array = new Float32Array(0);
    const problem = jsProblem(q.subarray(0, jsTokens * QUERY_STRIDE), jsTokens, Array.from({ length: jsTokens }, (_, p) => p));
    const jsTime = measure(baselinePlan, () => elapsedMs(() => {
      jsOutput = attentionPlainJS(problem);
    }));
    const jsFlops = prefillFlops(jsTokens);
    const jsGflops = jsFlops / (jsTime.medianMs * 1e6);
    const js: BaselineResult = {
      id: `js-prefill-${tokenLabel(jsTokens)}`, kind: 'prefill', tokens: jsTokens, queries: jsTokens, reads: 'f32', time: jsTime,
      flops: jsFlops, gflopsPerSecond: jsGflops, peakFraction: (jsGflops * GB) / limits.fmaFlopsPerSecond,
      sharedBy: prefillCases.map((s) => s.id),
    };
    baselines.push(js);
    say(baselineLine(js));
    for (const spec of prefillCases) {
      status(`${spec.id}: checking, timing...`);
      const fullReference = spec.tokens === jsTokens ? jsOutput : undefined;
      record(spec, () => runPrefill(spec, { q, k, v, fullReference }, prefillPlan), (result) => {
        const medianMs = result.time?.medianMs ?? NaN;
        result.flops = prefillFlops(spec.tokens);
        result.gflopsPerSecond = result.flops / (medianMs * 1e6);
        result.peakFraction = spec.device === 'cpu' ? (result.gflopsPerSecond * GB) / limits.fmaFlopsPerSecond : null;
        result.baseline = { id: js.id, tokens: jsTokens, medianMs: jsTime.medianMs, gflopsPerSecond: jsGflops };
        result.speedup = result.gflopsPerSecond / jsGflops;
        result.speedupBasis = spec.tokens === jsTokens
          ? 'time of the plain-JS causal prefill of the same size (single thread, f32 K/V)'
          : `GFLOP/s over the plain-JS causal prefill at ${jsTokens} tokens (single thread, f32 K/V; ${tokenLabel(spec.tokens)} in plain JS would take minutes)`;
      });
    }
  }

  let kivi: KiviRecord | null = null;
  if (runsKivi) {
    kivi = runKivi({
      quick: args.quick, k, v, limits, plan: decodePlan, say, status,
      reproduce: `npm run bench -- ${args.quick ? '--quick ' : ''}--only kivi`,
    });
  }

  let policies: PoliciesRecord | null = null;
  if (runsPolicies) {
    policies = runPolicies({
      quick: args.quick, cuda, limits, say, status, reproduce: `npm run bench -- ${args.quick ? '--quick ' : ''}--only policies`,
    });
  }

  const heads: HeadsRecord | null = runsHeads
    ? runHeads({ quick: args.quick, say, status, reproduce: `npm run bench -- ${args.quick ? '--quick ' : ''}--only heads` }) : null;

  let retrieval: RetrievalRecord | null = null;
  if (runsRetrieval) {
    retrieval = await runRetrieval({
      quick: args.quick, say, status, reproduce: `npm run bench -- ${args.quick ? '--quick ' : ''}--only retrieval`,
    });
  }

  const serving: ServingRecord | null = runsServing ? runServing({ quick: args.quick, say, status }) : null;

  // The limits again, after the cases: a shared or throttled machine shows here as drift, and the
  // fractions above (against the first probe) are then only as good as that drift allows.
  status('probing the machine limits again...');
  const limitsAfter = probeMachine(probe);
  const drift = (before: number, after: number) => Math.abs(after - before) / before;
  const maxDrift = Math.max(
    drift(limits.readBytesPerSecond, limitsAfter.readBytesPerSecond), drift(limits.fmaFlopsPerSecond, limitsAfter.fmaFlopsPerSecond));
  say();
  say(`limits after the cases: read bandwidth ${(limitsAfter.readBytesPerSecond / GB).toFixed(1)} GB/s, FMA peak ${(limitsAfter.fmaFlopsPerSecond / GB).toFixed(1)} GFLOP/s` +
    (maxDrift > DRIFT_WARNING ? `  WARNING: ${(maxDrift * 100).toFixed(0)}% off the first probe; the machine is shared or throttling, fractions are uncertain` : '  (stable)'));


  // Headline: the issue's targets, reported, not asserted.
  const targets: TargetResult[] = TARGETS.map((t) => {
    const result = results.find((r) => r.id === t.caseId);
    const value = result?.[t.metric] ?? null;
    const verdict: TargetResult['verdict'] = result === undefined ? 'not measured'
      : result.status !== 'ok' ? result.status : value === null ? 'not measured'
        // A fraction above 1 beats the measured limit: the probe read low, so the fraction proves nothing.
        : t.metric !== 'speedup' && value > 1 ? 'suspect' : value >= t.target ? 'met' : 'not met';
    return { name: t.name, caseId: t.caseId, value, target: t.target, unit: t.metric === 'speedup' ? 'x' : 'fraction', verdict };
  });
  targets.push(...kiviTargets(kivi));
  targets.push(...policiesTargets(policies));
  targets.push(...headsTargets(heads));
  targets.push(...retrievalTargets(retrieval));
  say();
  say(`Targets (reported, not asserted)${complete ? '' : ' - partial run: cases not in it show "not measured"'}`);
  for (const line of targetLines(targets)) say(line);
  const aboveLimit = [
    ...results.filter((r) => (r.bandwidthFraction ?? 0) > 1 || (r.peakFraction ?? 0) > 1).map((r) => r.id), ...kiviAboveLimit(kivi),
  ];
  if (aboveLimit.length > 0) {
    say(`  suspect: ${aboveLimit.join(', ')} ran faster than the probed limit allows, so the probe under-measured this machine`);
    say(`  and those fractions overstate the kernels; rerun, or compare with an outside figure (e.g. STREAM).`);
  }

  const notes = [
    `GB = 1e9 bytes, GFLOP = 1e9 FLOPs. KV MB = T x kvHeads x headDim x 2 (K and V) x bytes per element / 1e6.`,
    `x BW = GB/s / measured read bandwidth; x peak = GFLOP/s / measured FMA peak (first probe of this run, ${limits.threads} threads).`,
    `ms = median of the timed runs; spread = p10-p90 (min-max below 10 runs). Decode on the CPU is timed cold: a ${EVICT_BYTES / 2 ** 20} MiB read between runs evicts the KV from the caches, as the other layers do in a real decode step, and a small decode on a separate cache then wakes the thread pool, which the previous layer keeps awake in a real step.`,
    `rel.err = relative L2 error of the output vs the plain-JS reference, checked before timing (tolerance ${TOLERANCE}); a case above it is FAILED and not timed.`,
    `Test values are multiples of 1/128 in [-2, 2): exact in f32, f16 and bf16, so every store holds the same numbers and one reference serves all three.`,
    `Plain JS (js-* rows, bench/baseline.ts): single thread, Float32Array K/V, f64 arithmetic, two-pass softmax with Math.exp; it always reads f32 K/V (twice the bytes of the f16/bf16 rows).`,
    `It runs once per T (${baselinePlan.minRuns} runs, median) and is shared by that T's stores. Prefill speed-up = GFLOP/s / plain-JS GFLOP/s at ${matrix.jsPrefillTokens} tokens (a time ratio only for the ${matrix.jsPrefillTokens}-token row).`,
    ...(cuda ? [`CUDA rows: no GPU probe, so x BW and x peak are n/a; their KV stays warm in the GPU's L2 between runs.`] : []),
    `Rerun one row: npm run bench -- --case <id>${args.quick ? ' (with --quick for the quick matrix)' : ''}.`,
    ...(kivi === null ? [] : kiviNotes(kivi)),
    ...(policies === null ? [] : policiesNotes(policies)),
    ...(heads === null ? [] : headsNotes(heads)),
    ...(retrieval === null ? [] : retrievalNotes(retrieval)),
    ...(serving === null ? [] : servingNotes(serving)),
  ];
  say();
  say('Notes');
  for (const note of notes) say(`  ${note}`);

  const failed = [...results.filter((r) => r.status !== 'ok').map((r) => `${r.id} (${r.status})`), ...kiviFailures(kivi), ...policiesFailures(policies), ...headsFailures(heads),
    ...retrievalFailures(retrieval), ...servingFailures(serving)];
  const durationMs = Date.now() - startedAt;
  const root = packageRoot();
  const stamp = new Date(startedAt).toISOString().replace(/\.\d+Z$/, 'Z').replace(/:/g, '-');
  const kind = results.some((r) => r.device === 'cuda') ? 'cuda' : 'cpu';
  const resultsDir = join(root, 'bench', 'results');
  const paths = args.json !== null ? [resolve(args.json)]
    : complete ? [join(resultsDir, `${kind}-${stamp}.json`), join(resultsDir, 'latest.json')]
      : [join(resultsDir, `${kind}-${stamp}.tmp.json`)];
  const json = {
    schema: 'kvslim-bench/1',
    createdAt: new Date(startedAt).toISOString(),
    durationMs,
    command,
    complete,
    git: gitState(root),
    machine: {
      cpuModel: cpus[0]?.model.trim() ?? null, cores: cpus.length, availableParallelism: os.availableParallelism(),
      memoryBytes: os.totalmem(), platform: os.platform(), arch: os.arch(), osRelease: os.release(),
      node: process.version, v8: process.versions.v8,
    },
    kvslim: {
      backends: info,
      env: Object.fromEntries(['KVSLIM_SIMD', 'KVSLIM_THREADS', 'KVSLIM_PREFETCH'].map((name) => [name, process.env[name] ?? null])),
    },
    limits: { ...limits, probe, probeMs, after: limitsAfter, drift: maxDrift },
    model: MODEL,
    method: {
      kvBytes: 'tokens x kvHeads x headDim x 2 (K and V) x bytes per element (f32 4, f16 2, bf16 2)',
      prefillFlops: '4 x qHeads x headDim x T(T+1)/2 (QK^T and PV, 2 FLOPs per multiply-add, causal)',
      units: 'GB = 1e9 bytes, GFLOP = 1e9 FLOPs, times in milliseconds',
      check: { metric: 'relative L2 error vs the plain-JS reference', tolerance: TOLERANCE, failedCasesAreNotTimed: true },
      data: 'seeded xorshift32 values, multiples of 1/128 in [-2, 2), exact in f32/f16/bf16; K seed 1, V seed 2, decode q seed 1000+T, prefill q seed 3',
      decode: { timing: decodePlan, coldCache: `CPU rows: ${EVICT_BYTES} bytes read between runs, then the thread pool woken`, appendChunkTokens: APPEND_CHUNK_TOKENS },
      prefill: { timing: 'warm-up = the checked run; then 5 runs (3 if one run exceeds 2 s) and at least 1 s, at most 30; fresh cache per run, creation untimed' },
      baseline: {
        source: 'bench/baseline.ts', timing: baselinePlan,
        description: 'plain JS, single thread, f64 arithmetic over Float32Array K/V (always f32), two-pass softmax with Math.exp',
        prefillTokens: matrix.jsPrefillTokens,
      },
    },
    baselines,
    cases: results,
    kivi,
    policies,
    heads,
    retrieval,
    serving,
    targets,
  };
  for (const path of paths) writeJson(path, json);
  say();
  const kiviRows = kivi === null ? '' : ` + ${kivi.decode.length + kivi.quality.rows.length} KIVI row(s) (${(kivi.durationMs / 1000).toFixed(1)} s)`;
  const policyRows = policies === null ? ''
    : ` + ${policies.rows.length + policies.prefillRows.length} policy row(s) (${(policies.durationMs / 1000).toFixed(1)} s)`;
  const headRows = heads === null ? '' : ` + ${heads.rows.length} head-scoring row(s) (${(heads.durationMs / 1000).toFixed(1)} s)`;
  const retrievalRows = retrieval === null ? ''
    : ` + ${retrieval.index.length + retrieval.decode.length} retrieval row(s) (${(retrieval.durationMs / 1000).toFixed(1)} s)`;
  const servingRows = serving === null ? '' : ` + ${serving.batches.length + (serving.park === null ? 0 : 1)} serving row(s)`;
  say(`${results.length} case(s)${kiviRows}${policyRows}${headRows}${retrievalRows}${servingRows}, ${failed.length} failed, ${(durationMs / 1000).toFixed(1)} s. JSON: ${paths.map(shortPath).join(', ')}`);
  say(`Reproduce: ${command}`);
  if (failed.length > 0) {
    say(`Failed: ${failed.join(', ')}`);
    process.exitCode = 1;
  }
}

main().catch((error: unknown) => {
  if (error instanceof UsageError) {
    process.stderr.write(`${error.message}\n\n${USAGE}\n`);
    process.exitCode = 2;
  } else {
    process.stderr.write(`${error instanceof Error ? error.stack ?? error.message : String(error)}\n`);
    process.exitCode = 1;
  }
});
