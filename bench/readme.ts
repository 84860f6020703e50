// Writes the headline table of bench/results/latest.json into README.md between the
// <!-- bench-table --> markers (and the KIVI, policies, heads and retrieval tables between theirs), so the
// README shows measured numbers, never typed ones.
// Usage: npm run bench:readme [-- <results.json>]
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { gpuPrefillText, targetGoalText, targetValueText, type TargetResult } from './report.js';

interface ResultCase {
  id: string; kind: string; device: string; store?: string; tokens: number; status: string;
  time?: { medianMs: number; spreadLowMs: number; spreadHighMs: number };
  gbPerSecond?: number; bandwidthFraction?: number | null; gflopsPerSecond?: number; peakFraction?: number | null;
  speedup?: number;
}

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const resultsPath = resolve(process.argv[2] ?? join(root, 'bench', 'results', 'latest.json'));
const results = JSON.parse(readFileSync(resultsPath, 'utf8')) as {
  createdAt: string; machine: { cpuModel: string; cores: number; node: string };
  kvslim: { backends: { cpu: { simd: string; threads: number; prefetch?: string } } };
  limits: { readBytesPerSecond: number; fmaFlopsPerSecond: number; after?: { readBytesPerSecond: number; fmaFlopsPerSecond: number } };
  cases: ResultCase[];
  targets?: TargetResult[];
  kivi?: {
    decode: Array<{
      id: string; bits: number; tokens: number; status: string; time?: { medianMs: number }; bytesRead?: number;
      bandwidthFraction?: number; peakFraction?: number; speedupOverF16?: number | null; compression?: number;
    }>;
    quality: {
      workload: { tokens: number };
      rows: Array<{
        id: string; bits: number; status: string; errorRatio?: number; outliers?: number; preRope?: boolean;
        perChannel?: { relL2Error: number; hitRate: number }; perToken?: { relL2Error: number; hitRate: number };
      }>;
    };
  } | null;
  policies?: {
    workload: { policies: { tokens: number } };
    gpuPrefill?: { tokens: number; runs: number; rows: Array<{ kind: string; medianMs: number; selectMs: number; overhead: number }> } | null;
    rows: Array<{
      id: string; kind: string; fraction: number | null; status: string; layers?: number; bytesFraction?: number; selectMs?: number;
      decode?: { medianMs: number }; timeFraction?: number;
      turns?: Array<{ relL2: number; mass: number; needleHits: number; needlePairs: number }>;
    }>;
  } | null;
  heads?: {
    workload: { tokens: number; layers: number; probes: number };
    duo: { sink: number; window: number; retrievalRatio: number };
    scores: { scoreMs: number; lowestRetrieving: number; highestLocal: number; orderedPairs: number };
    rows: Array<{
      kind: string; status: string; kept?: number[][]; keptAsTruth?: boolean; bytesFraction?: number; decode?: { medianMs: number };
      timeFraction?: number; needleHits?: number; needlePairs?: number; localHits?: number; localPairs?: number;
      worstStreamedRelL2?: number | null; worstRetrievalRelL2?: number | null;
    }>;
  } | null;
  retrieval?: {
    plan: { testQueries: number; trainQueries: number; prefillTokens: number };
    index: Array<{
      kind: string; keys: number; setting: string | null; status: string; recall?: number; minRecall?: number;
      scannedFraction?: number | null; medianMs?: number; p99Ms?: number; buildMs?: number; bytes?: number | null;
    }>;
    decode: Array<{
      kind: string; tokens: number; status: string; loadedTokens?: number; decode?: { medianMs: number }; pairedFull?: { medianMs: number };
      speedup?: number; indexBuildMs?: number; prefillMs?: number; indexBytes?: number; meanRelL2?: number; maxRelL2?: number;
      needleHits?: number; needlePairs?: number;
    }>;
  } | null;
};

const number = (value: unknown, digits: number): string => (typeof value === 'number' ? value.toFixed(digits) : 'n/a');
const lines: string[] = [];
const limits = results.limits;
const cpu = results.kvslim.backends.cpu;
lines.push(
  `Measured ${results.createdAt} on ${results.machine.cpuModel} (${results.machine.cores} cores, ` +
    `${cpu.simd}, ${cpu.threads} threads${cpu.prefetch ? `, prefetch into ${cpu.prefetch.toUpperCase()}` : ''}), Node ${results.machine.node}; ` +
    `read bandwidth ${number(limits.readBytesPerSecond / 1e9, 1)} GB/s and f32 FMA peak ${number(limits.fmaFlopsPerSecond / 1e9, 0)} GFLOP/s ` +
    `probed in the same run${limits.after ? ` (after the cases: ${number(limits.after.readBytesPerSecond / 1e9, 1)} GB/s, ${number(limits.after.fmaFlopsPerSecond / 1e9, 0)} GFLOP/s)` : ''}.`,
  '',
  '| case | ms (median) | spread ms (p10–p90) | rate | of the probed limit | vs plain JS |',
  '| --- | ---: | ---: | ---: | ---: | ---: |',
);
for (const c of results.cases) {
  if (c.id.startsWith('js-') || c.status !== 'ok' || !c.time) continue;
  const rate = c.kind === 'decode' ? `${number(c.gbPerSecond, 1)} GB/s` : `${number(c.gflopsPerSecond, 0)} GFLOP/s`;
  const fraction = c.kind === 'decode' ? number(c.bandwidthFraction, 2) : number(c.peakFraction, 2);
  lines.push(
    `| ${c.id} | ${number(c.time.medianMs, 2)} | ${number(c.time.spreadLowMs, 2)}–${number(c.time.spreadHighMs, 2)} | ${rate} | ${fraction} | ${number(c.speedup, 0)}× |`,
  );
}
lines.push('', `Reproduce with \`npm run bench\` (JSON in \`bench/results/\`); one row with \`npm run bench -- --case <case>\`.`);

// The KIVI section's tables (bench/kivi.ts), when the run had it.
const kiviLines: string[] = [];
if (results.kivi) {
  kiviLines.push(
    'KIVI decode (group 32, residual 128), one query over T tokens, same run:', '',
    '| store | T | ms | MB read | of bandwidth | of FMA peak | vs f16 cache | compression |',
    '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
  );
  for (const row of results.kivi.decode) {
    if (row.status !== 'ok' || !row.time) continue;
    kiviLines.push(
      `| ${row.bits === 16 ? 'f16' : `KIVI-${row.bits}`} | ${row.tokens / 1024}K | ${number(row.time.medianMs, 2)} | ${number((row.bytesRead ?? NaN) / 1e6, 1)} | ` +
        `${number(row.bandwidthFraction, 2)} | ${number(row.peakFraction, 2)} | ${number(row.speedupOverF16, 2)}× | ${number(row.compression, 2)}× |`,
    );
  }
  kiviLines.push(
    '', `KIVI quality on ${results.kivi.quality.workload.tokens / 1024}K tokens whose keys have outlier channels, with planted needles:`, '',
    '| store | rel. L2 | needle hits | rel. L2, keys per token (ablation) | needle hits | error ratio |',
    '| --- | ---: | ---: | ---: | ---: | ---: |',
  );
  // Plain rows (keys per channel, with the per-token ablation), then the KVQuant variants: +1%
  // dense-and-sparse outliers (ratio = plain / this), and post- vs pre-RoPE keys on a rotated
  // workload (ratio on the pre-RoPE row = post-RoPE / pre-RoPE).
  for (const row of results.kivi.quality.rows) {
    if (row.status !== 'ok' || !row.perChannel) continue;
    const name = row.id.endsWith('-outliers') ? `KIVI-${row.bits} + 1% outliers`
      : row.id.endsWith('-postrope') ? `KIVI-${row.bits}, RoPE workload, post-RoPE keys`
        : row.id.endsWith('-prerope') ? `KIVI-${row.bits}, RoPE workload, pre-RoPE keys` : `KIVI-${row.bits}`;
    const ablation = row.perToken ? `${number(row.perToken.relL2Error, 4)} | ${number(row.perToken.hitRate * 100, 1)}%` : '– | –';
    kiviLines.push(
      `| ${name} | ${number(row.perChannel.relL2Error, 4)} | ${number(row.perChannel.hitRate * 100, 1)}% | ${ablation} | ` +
        `${row.errorRatio === undefined ? '–' : `${number(row.errorRatio, 2)}×`} |`,
    );
  }
  kiviLines.push('', 'Reproduce with `npm run bench -- --only kivi`.');
}

// The selection policies section's main table (bench/policies.ts), when the run had it.
const policyLines: string[] = [];
if (results.policies) {
  policyLines.push(
    `Selection policies on a ${results.policies.workload.policies.tokens / 1024}K-token prompt (32q/8kv/128; each cache holds ` +
      `${results.policies.rows[0]?.layers ?? 1} layers of the same data, and select ms and decode ms are per layer) whose last ` +
      '32 queries ask needle 1; turn 1 asks needle 1 again, turn 2 a different needle (selection was made for turn 1). ' +
      '`+kivi2`: the same selection over the 2-bit KIVI store:', '',
    '| policy | budget | bytes / full | select ms | decode ms | time / full | turn 1 rel. L2 | turn 1 needle hits | turn 2 rel. L2 | turn 2 needle hits |',
    '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
  );
  for (const row of results.policies.rows) {
    if (row.status !== 'ok' || !row.decode || !row.turns || row.turns.length < 2) continue;
    const [t1, t2] = row.turns;
    policyLines.push(
      `| ${row.kind} | ${row.fraction === null ? 'all' : `1/${row.fraction}`} | ${number(row.bytesFraction, 3)} | ${row.selectMs === undefined ? '–' : number(row.selectMs, 0)} | ` +
        `${number(row.decode.medianMs, 2)} | ${number(row.timeFraction, 2)} | ${number(t1.relL2, 3)} | ${t1.needleHits}/${t1.needlePairs} | ` +
        `${number(t2.relL2, 3)} | ${t2.needleHits}/${t2.needlePairs} |`,
    );
  }
  const gpu = results.policies.gpuPrefill;
  if (gpu) policyLines.push('', `${gpuPrefillText(gpu)}.`);
  policyLines.push('', 'Reproduce with `npm run bench -- --only policies`.');
}

// The head-scoring section's table (bench/heads.ts), when the run had it.
const headLines: string[] = [];
if (results.heads) {
  const h = results.heads;
  const scientific = (x: number | null | undefined) => (typeof x === 'number' ? x.toExponential(1) : '–');
  const kept = (rows: number[][] | undefined) => {
    const counts = new Map<number, number>();
    for (const n of (rows ?? []).flat()) counts.set(n, (counts.get(n) ?? 0) + 1);
    return [...counts].sort((a, b) => b[0] - a[0]).map(([n, c]) => `${c} × ${n}`).join(', ');
  };
  headLines.push(
    `Measured ${results.createdAt} on ${results.machine.cpuModel} (${results.machine.cores} cores). ` +
    `Head scoring on ${h.workload.tokens / 1024}K tokens × ${h.workload.layers} layers (32q/8kv/128, f16) in which half the kv heads retrieve ` +
      `needles far back and half attend to their last tokens: \`scoreHeads\` (${number(h.scores.scoreMs / 1000, 1)} s, from the last ` +
      `${h.workload.probes} rows' Q/K/V) scores the retrieving kv heads ${scientific(h.scores.lowestRetrieving)} and up, the local ones ` +
      `${scientific(h.scores.highestLocal)} at most (${number(h.scores.orderedPairs * 100, 0)}% of pairs in order); \`duo\` keeps the top ` +
      `${h.duo.retrievalRatio * 100}% whole and the rest sink ${h.duo.sink} + window ${h.duo.window}; \`duo-inverted\` negates the scores:`, '',
    '| cache | kept tokens (kv heads × tokens) | as truth | bytes / full | decode ms | time / full | needle hits | local hits | worst rel. L2, streamed heads | worst rel. L2, whole heads |',
    '| --- | --- | :---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
  );
  for (const row of h.rows) {
    if (row.status !== 'ok') continue;
    headLines.push(
      `| ${row.kind} | ${kept(row.kept)} | ${row.keptAsTruth === undefined ? '–' : row.keptAsTruth ? 'yes' : 'no'} | ${number(row.bytesFraction, 3)} | ` +
        `${number(row.decode?.medianMs, 2)} | ${number(row.timeFraction, 2)} | ${row.needleHits}/${row.needlePairs} | ${row.localHits}/${row.localPairs} | ` +
        `${scientific(row.worstStreamedRelL2)} | ${scientific(row.worstRetrievalRelL2)} |`,
    );
  }
  headLines.push('', 'Reproduce with `npm run bench -- --only heads`.');
}

// The retrieval section's tables (bench/retrieval.ts), when the run had it.
const retrievalLines: string[] = [];
if (results.retrieval) {
  const r = results.retrieval;
  const label = (tokens: number) => (tokens % 1024 === 0 ? `${tokens / 1024}K` : String(tokens));
  retrievalLines.push(
    `Key indexes on one kv head (headDim 128); each of ${r.plan.testQueries} test queries is a GQA group of 4 rows (a key scores by its ` +
      `best row), from a shifted distribution unlike the keys'; the graph is trained on ${r.plan.trainQueries} query rows of that distribution; ` +
      'recall@100 vs the exact top-100; latency per query, warm:', '',
    '| index | keys | setting | recall@100 | keys scanned | median ms | p99 ms | build ms | MB |',
    '| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |',
  );
  for (const row of r.index) {
    if (row.status !== 'ok') continue;
    const bytes = row.bytes === null || row.bytes === undefined ? '–' : `${row.kind === 'hnswlib' ? '≈' : ''}${number(row.bytes / 1e6, 1)}`;
    retrievalLines.push(
      `| ${row.kind} | ${label(row.keys)} | ${row.setting ?? '–'} | ${number(row.recall, 3)} | ` +
        `${row.scannedFraction === null || row.scannedFraction === undefined ? '–' : number(row.scannedFraction, 4)} | ${number(row.medianMs, 3)} | ` +
        `${number(row.p99Ms, 3)} | ${number(row.buildMs, 0)} | ${bytes} |`,
    );
  }
  retrievalLines.push(
    '', `Decode over one layer (32q/8kv/128, f16), 4 turns each asking a different needle; retrieval topK 100, sink 128, window 512; ` +
      `quest 2048 tokens (128 pages of 16); step = attend() of the turn's question, cold, beside the full cache in the same state:`, '',
    '| policy | T | tokens read | step ms | full ms | speed-up | index build ms | index MB | rel. L2 mean | rel. L2 max | needle hits |',
    '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
  );
  for (const row of r.decode) {
    if (row.status !== 'ok' || !row.decode) continue;
    retrievalLines.push(
      `| ${row.kind} | ${label(row.tokens)} | ${number(row.loadedTokens, 0)} | ${number(row.decode.medianMs, 2)} | ` +
        `${number(row.pairedFull?.medianMs, 2)} | ${number(row.speedup, 2)}× | ${row.kind === 'full' ? '–' : number(row.indexBuildMs, 0)} | ` +
        `${row.kind === 'full' ? '–' : number((row.indexBytes ?? NaN) / 1e6, 1)} | ${number(row.meanRelL2, 3)} | ${number(row.maxRelL2, 3)} | ` +
        `${row.needleHits}/${row.needlePairs} |`,
    );
  }
  retrievalLines.push('', 'Reproduce with `npm run bench -- --only retrieval`.');
}

// Every target of the issues beside what this run measured: the README's verdicts come from the
// same record as its tables.
const targetRows: string[] = [];
if (results.targets !== undefined && results.targets.length > 0) {
  const met = results.targets.filter((t) => t.verdict === 'met').length;
  targetRows.push(
    `Targets of the issues, as the run of ${results.createdAt} measured them (${met} of ${results.targets.length} met):`,
    '', '| target | measured | goal | verdict |', '| --- | ---: | ---: | --- |',
    ...results.targets.map((t) => {
      const text = (s: string) => s.replace('<=', '≤').replace('>=', '≥').replace(/(\d)x$/, '$1×');
      return `| ${t.name} | ${text(targetValueText(t))} | ${text(targetGoalText(t))} | ${t.verdict} |`;
    }),
  );
}

const readmePath = join(root, 'README.md');
let readme = readFileSync(readmePath, 'utf8');
/** Replaces the text between `<!-- name -->` and `<!-- /name -->`. */
function section(text: string, name: string, body: string[]): string {
  const start = `<!-- ${name} -->`, end = `<!-- /${name} -->`;
  const from = text.indexOf(start), to = text.indexOf(end);
  if (from < 0 || to < 0) throw new Error(`README.md has no ${start} ... ${end} markers`);
  return `${text.slice(0, from)}${start}\n${body.join('\n')}\n${text.slice(to)}`;
}
// A partial run (e.g. --only retrieval) has no cases: leave the headline table as it is.
if (results.cases.length > 0) readme = section(readme, 'bench-table', lines);
if (targetRows.length > 0) readme = section(readme, 'bench-targets', targetRows);
if (kiviLines.length > 0) readme = section(readme, 'bench-kivi', kiviLines);
if (policyLines.length > 0) readme = section(readme, 'bench-policies', policyLines);
if (headLines.length > 0) readme = section(readme, 'bench-heads', headLines);
if (retrievalLines.length > 0) readme = section(readme, 'bench-retrieval', retrievalLines);
writeFileSync(readmePath, readme);
const written = (results.cases.length > 0 ? lines.length : 0) + targetRows.length + kiviLines.length + policyLines.length + headLines.length + retrievalLines.length;
console.log(`README.md: wrote ${written} lines from ${resultsPath}`);
