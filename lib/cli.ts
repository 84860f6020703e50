#!/usr/bin/env node
// The `kvslim` command line. `kvslim trace` runs a llama2.c checkpoint over a prompt (the runner of
// lib/models/llama2c, loaded only for this command) and writes what each attention layer saw as a
// safetensors trace (lib/trace/trace.ts). `kvslim eval` replays a workload or trace through cache
// policies (lib/eval); `kvslim score-heads` classifies a trace's kv heads for DuoAttention
// (lib/heads); `kvslim inspect` lists a safetensors file.
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, realpathSync, writeFileSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { KVSlimError } from './errors.js';
import type { Report } from './eval/report.js';
import type { PolicySpec } from './policy.js';
import type { ResolvedSelect } from './select.js';
import type { TraceLayer } from './trace/trace.js';

const traceUsage = `kvslim trace --model <model.bin> --tokenizer <tokenizer.bin> (--prompt <text> | --probe <length>) [options]
  --model <path>        llama2.c checkpoint (legacy format)
  --tokenizer <path>    its tokenizer.bin
  --prompt <text>       the text to run (BOS and a dummy-prefix space are added, as llama2.c does)
  --probe <length>      instead of a prompt, the retrieval-head probe: BOS, then a random segment of
                        <length> token ids twice (headProbe); kvslim score-heads scores its copies
  --seed <n>            the probe's seed (default 1)
  --out <path>          where to write the trace (default trace.safetensors)
  --steps <n>           greedy tokens to generate and record after the prompt (default 0)
  --store f32|f16|bf16  how the cache stores keys and values while tracing (default f32)
  --no-out              leave out layers.{i}.out (the attention outputs)

The trace holds, per layer i: layers.{i}.q [n, heads, headDim], layers.{i}.k and layers.{i}.v
[n, kvHeads, headDim] (q and k post-RoPE), layers.{i}.out like q; little-endian f32. Its
__metadata__ holds format, config (shapes, RoPE, model facts) and tokens (the n token ids), and
probe ({ length, seed, firstId, bos }) for a --probe trace.
`;

const evalUsage = `kvslim eval [--workload <name> | --trace <file>] [--policy <spec>]... [options]
  --workload <name>     built-in synthetic workload: needles-4k (default), needles-32k
  --trace <file>        a kvslim trace (kvslim trace): rows after the prompt are the queries
  --policy <spec>       a policy to evaluate (repeatable; default full): full, f32, f16, bf16,
                        kivi2, kivi4, kivi8, streaming:<budget>, snapkv:<budget>,
                        pyramidkv:<budget>, h2o:<budget>, quest:<pages>, flat:<topK>,
                        ivf:<topK>, graph:<topK>, actqkv:<blocks>, duo:<heads.json>
                        (DuoAttention with the scores, sink, window and ratio that
                        kvslim score-heads --json wrote)
                        (full selection with that store), <selection>/<store> as reports
                        name them (snapkv:1024/kivi2: SnapKV's kept tokens in 2-bit KIVI),
                        or a PolicySpec as JSON, e.g.
                        '{"select":{"kind":"full"},"store":{"kind":"bf16"}}'
  --turns <n>           query turns to run (default: all the source holds)
  --mode <mode>         multi-turn (default), multi-request, or both
  --seed <n>            seed of the workload generator (default: the workload's own)
  --device cpu|cuda     where caches live (default cpu)
  --json <path>         write the reports (scbench-report/1, one per policy x mode) as JSON
  --html <path>         write a self-contained HTML page of charts

Prints a table per run: compression ratio (bytes / full f16), attention output error against exact
attention (relative L2, cosine), needle hit rate (policy and exact), prefill and decode times.
`;

const scoreHeadsUsage = `kvslim score-heads --trace <file> [options]
  --trace <file>        a kvslim trace (kvslim trace); each layer's last --probes query rows are scored
  --sink <n>            sink tokens of the streaming alternative (default 64)
  --window <n>          recent tokens of the streaming alternative (default 256): score with the
                        sink and window you will deploy, on a trace longer than both
  --probes <n>          probe queries per layer (default 64)
  --copy-segment <n>    the trace ends with a segment of n tokens said twice: score copying exactly
                        (default: the trace's probe length when kvslim trace --probe wrote it, else
                        the sequential-copy proxy)
  --ratio <r>           share of kv heads kept whole, ranked across layers (duo's retrievalRatio;
                        default 0.5 with GQA, 0.25 without)
  --threshold <t>       instead of --ratio: keep whole the kv heads whose score, clipped to [0, 1],
                        is at least t (duo's threshold; Duo's gates use 0.5)
  --device cpu|cuda     where the probes' full attention is computed (default cpu)
  --json <path>         write the scores, the details and the mask as JSON (kvslim-head-scores/1)

Prints per layer and kv head the score, E (output deviation when the head keeps only sink +
window, max over its query heads), M (attention mass outside them), R (copy score) and the role at
--ratio or --threshold: retrieval (keeps every token) or streaming (sink + window). A cache uses
them as policy: { select: { kind: 'duo', heads: <json>.scores, copyHeads: <json>.copyHeads, sink,
window, retrievalRatio: <json>.retrievalRatio } } (or threshold: <json>.threshold; --policy
duo:<json> does this). Copy heads (R > 0.1) are retrieval heads whatever the ratio or threshold.
`;

const inspectUsage = `kvslim inspect <file.safetensors>
  Lists the tensors (name, dtype, shape, bytes) and the __metadata__ of a safetensors file.
`;

const benchUsage = `kvslim bench [bench options]
  Runs the benchmark (the same as npm run bench): decode and prefill attention of a Llama-3-8B
  layer against this machine's measured memory bandwidth and FMA peak, and a plain-JS baseline,
  then KIVI, the selection policies, head scoring, retrieval and serving (12-17 min on 2 cores).
  Its own options (--quick, --only decode|prefill|kivi|policies|heads|retrieval|serving, --case <id>,
  --json <path>, --help) follow: kvslim bench --quick.
`;

const usage = `Usage: kvslim <command> [options]

Commands:
  trace        run a llama2.c model over a prompt; write each layer's Q/K/V as a safetensors trace
  eval         evaluate cache policies on a workload or trace (SCBench-style report)
  score-heads  classify a trace's kv heads as retrieval or streaming heads (DuoAttention)
  inspect      list the tensors and metadata of a safetensors file
  bench        run the benchmark (npm run bench)
  help         this text (also --help); kvslim <command> --help for one command

${traceUsage}
${evalUsage}
${scoreHeadsUsage}
${inspectUsage}
${benchUsage}`;

/** Help text per command. */
const commandUsage: Record<string, string> = {
  trace: traceUsage, eval: evalUsage, evaluate: evalUsage, 'score-heads': scoreHeadsUsage, inspect: inspectUsage, bench: benchUsage,
};

/** Writes the trace of one prompt (plus `steps` greedy tokens); resolves to the exit status. */
async function trace(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      model: { type: 'string' }, tokenizer: { type: 'string' }, prompt: { type: 'string' }, probe: { type: 'string' },
      seed: { type: 'string' }, out: { type: 'string', default: 'trace.safetensors' }, steps: { type: 'string', default: '0' },
      store: { type: 'string', default: 'f32' }, 'no-out': { type: 'boolean', default: false },
    },
  });
  const { model: modelPath, tokenizer: tokenizerPath, prompt } = values;
  if (modelPath === undefined || tokenizerPath === undefined || (prompt === undefined) === (values.probe === undefined)) {
    throw new UsageError('trace needs --model, --tokenizer and one of --prompt or --probe');
  }
  const steps = Number(values.steps);
  if (!Number.isInteger(steps) || steps < 0) throw new UsageError(`--steps must be an integer >= 0, not '${values.steps}'`);
  const probeLength = nonNegativeInteger('--probe', values.probe, 1);
  const seed = nonNegativeInteger('--seed', values.seed, 0);
  if (seed !== undefined && probeLength === undefined) throw new UsageError('--seed applies to --probe');
  // The probe is scored as the end of the prompt: generated tokens after it would move it.
  if (probeLength !== undefined && steps > 0) throw new UsageError('--steps does not apply to --probe (the probe must end the trace)');
  const store = values.store;
  if (store !== 'f32' && store !== 'f16' && store !== 'bf16') throw new UsageError(`--store must be f32, f16 or bf16, not '${store}'`);

  // The runner (and the native addon behind it) load only when a trace is asked for.
  const [{ readCheckpoint }, { Llama2 }, { Tokenizer }, { argmax }, { writeTrace }, { headProbe }] = await Promise.all([
    import('./models/llama2c/checkpoint.js'), import('./models/llama2c/model.js'),
    import('./models/llama2c/tokenizer.js'), import('./models/llama2c/sampler.js'), import('./trace/trace.js'),
    import('./heads/probe.js'),
  ]);
  const model = new Llama2(readCheckpoint(modelPath));
  const { config } = model;
  const tokenizer = Tokenizer.read(tokenizerPath, config.vocabSize);
  // llama2.c's ids 0-2 are <unk>, <s> (BOS) and </s>: the probe draws past them.
  const probe = probeLength === undefined ? undefined : { length: probeLength, seed: seed ?? 1, firstId: 3, bos: 1 };
  const tokens = probe === undefined ? tokenizer.encode(prompt as string) : Array.from(headProbe({ ...probe, vocab: config.vocabSize }));
  const promptTokens = tokens.length;
  if (promptTokens + steps > config.seqLen) {
    throw new KVSlimError('ERR_SHAPE', `The prompt (${promptTokens} tokens) and --steps ${steps} exceed the model's context of ${config.seqLen}`);
  }

  // Each forward pass shows every layer its block's q, k, v and out: copy them into the rows of the
  // block's positions.
  const rows = promptTokens + steps;
  const qRow = config.heads * config.headDim;
  const kvRow = config.kvHeads * config.headDim;
  const layers: TraceLayer[] = Array.from({ length: config.layers }, () => ({
    q: new Float32Array(rows * qRow), k: new Float32Array(rows * kvRow), v: new Float32Array(rows * kvRow),
    ...(!values['no-out'] && { out: new Float32Array(rows * qRow) }),
  }));
  let position = 0; // of the block's first token
  const observe = (layer: number, block: Required<TraceLayer>) => {
    const target = layers[layer];
    target.q.set(block.q, position * qRow);
    target.k.set(block.k, position * kvRow);
    target.v.set(block.v, position * kvRow);
    target.out?.set(block.out, position * qRow);
  };
  const cache = model.createCache({ policy: { store: { kind: store } } });
  try {
    let logits = model.forward(cache, tokens, { observe });
    for (position = promptTokens; position < rows; position++) {
      const token = argmax(logits);
      tokens.push(token);
      logits = model.forward(cache, [token], { observe }); // records the generated token's q, k, v
    }
  } finally {
    cache.dispose();
  }
  writeTrace(values.out, layers, {
    config: {
      layers: config.layers, qHeads: config.heads, kvHeads: config.kvHeads, headDim: config.headDim,
      dim: config.dim, hiddenDim: config.hiddenDim, vocabSize: config.vocabSize, seqLen: config.seqLen,
      rope: { theta: 10000, style: 'adjacent' }, keys: 'post-rope', store, model: basename(modelPath),
    },
    tokens,
    promptTokens,
    ...(probe === undefined ? { prompt } : { probe }),
  });
  process.stdout.write(`wrote ${values.out}: ${config.layers} layers x ${tokens.length} tokens (${promptTokens} prompt + ${steps} generated)\n`);
  return 0;
}

/** Policy shorthands of `kvslim eval --policy`: full selection with the named store. */
const policyShorthands: Record<string, PolicySpec> = {
  full: {}, f16: { store: { kind: 'f16' } }, f32: { store: { kind: 'f32' } }, bf16: { store: { kind: 'bf16' } },
  'full/f16': { store: { kind: 'f16' } }, 'full/f32': { store: { kind: 'f32' } }, 'full/bf16': { store: { kind: 'bf16' } },
  kivi2: { store: { kind: 'kivi', bits: 2 } }, kivi4: { store: { kind: 'kivi', bits: 4 } }, kivi8: { store: { kind: 'kivi', bits: 8 } },
};

/** `duo:<file>`: DuoAttention from a kvslim score-heads --json file (kvslim-head-scores/1). */
function duoFromScores(path: string): PolicySpec {
  let record: Record<string, unknown>;
  try {
    record = JSON.parse(readFileSync(path, 'utf8')) as Record<string, unknown>;
  } catch (error) {
    throw new UsageError(`--policy duo:${path}: ${(error as Error).message}`);
  }
  if (record === null || typeof record !== 'object' || record.format !== 'kvslim-head-scores/1') {
    throw new UsageError(`--policy duo:${path}: not a kvslim score-heads file (format kvslim-head-scores/1)`);
  }
  // The policy checks the scores, sink, window and ratio (and their count against the cache's shape).
  return {
    select: {
      kind: 'duo', heads: record.scores as number[][], sink: record.sink as number, window: record.window as number,
      ...(typeof record.threshold === 'number' ? { threshold: record.threshold } : { retrievalRatio: record.retrievalRatio as number }),
      ...(record.copyHeads === undefined ? {} : { copyHeads: record.copyHeads as boolean[][] }),
    },
  };
}

/** A `--policy` argument: a shorthand or a PolicySpec as JSON (checked by evaluate before any work). */
function parsePolicy(text: string): PolicySpec {
  if (Object.hasOwn(policyShorthands, text)) return policyShorthands[text];
  if (text.startsWith('duo:')) return duoFromScores(text.slice('duo:'.length));
  // <selection>:<budget>: streaming keeps 4 sinks + (budget - 4) recent tokens.
  // quest:<pages>, flat|ivf|graph:<topK> (retrieval), actqkv:<blocks per layer>.
  const loading = /^(quest|flat|ivf|graph|actqkv):(\d+)$/.exec(text);
  if (loading !== null) {
    const count = Number(loading[2]);
    if (loading[1] === 'quest') return { select: { kind: 'quest', pages: count } };
    if (loading[1] === 'actqkv') return { select: { kind: 'actqkv', blocks: count } };
    return { select: { kind: 'retrieval', index: loading[1] as 'flat' | 'ivf' | 'graph', topK: count } };
  }
  const budgeted = /^(streaming|snapkv|pyramidkv|h2o):(\d+)$/.exec(text);
  if (budgeted !== null) {
    const budget = Number(budgeted[2]);
    if (budgeted[1] === 'streaming') return { select: { kind: 'streaming', sink: 4, window: Math.max(1, budget - 4) } };
    return { select: { kind: budgeted[1] as 'snapkv' | 'pyramidkv' | 'h2o', budget } };
  }
  // <selection>/<store>, the report's name of a policy (snapkv:1024/kivi2).
  const slash = text.lastIndexOf('/');
  const store = slash > 0 && !text.trimStart().startsWith('{') ? policyShorthands[text.slice(slash + 1)]?.store : undefined;
  if (store !== undefined && Object.hasOwn(policyShorthands, text.slice(slash + 1))) {
    return { ...parsePolicy(text.slice(0, slash)), store };
  }
  if (text.trimStart().startsWith('{')) {
    try {
      return JSON.parse(text) as PolicySpec;
    } catch (error) {
      throw new UsageError(`--policy '${text}' is not valid JSON (${(error as Error).message})`);
    }
  }
  throw new UsageError(`--policy must be one of ${Object.keys(policyShorthands).join(', ')} or a PolicySpec as JSON, not '${text}'`);
}

function nonNegativeInteger(flag: string, text: string | undefined, minimum: number): number | undefined {
  if (text === undefined) return undefined;
  const value = Number(text);
  if (!/^\d+$/.test(text.trim()) || !Number.isSafeInteger(value) || value < minimum) throw new UsageError(`${flag} must be an integer >= ${minimum}, not '${text}'`);
  return value;
}

/** Evaluates policies on a workload or trace; prints a table, writes JSON / HTML; resolves to the exit status. */
async function evalCommand(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    options: {
      workload: { type: 'string' }, trace: { type: 'string' }, policy: { type: 'string', multiple: true },
      turns: { type: 'string' }, mode: { type: 'string', default: 'multi-turn' }, seed: { type: 'string' },
      device: { type: 'string', default: 'cpu' }, json: { type: 'string' }, html: { type: 'string' },
    },
  });
  if (positionals.length > 0) throw new UsageError(`eval takes no positional arguments, received '${positionals.join(' ')}'`);
  if (values.workload !== undefined && values.trace !== undefined) throw new UsageError('eval takes --workload or --trace, not both');
  const modes = values.mode === 'both' ? (['multi-turn', 'multi-request'] as const) : [values.mode];
  for (const mode of modes) {
    if (mode !== 'multi-turn' && mode !== 'multi-request') throw new UsageError(`--mode must be multi-turn, multi-request or both, not '${values.mode}'`);
  }
  const device = values.device;
  if (device !== 'cpu' && device !== 'cuda') throw new UsageError(`--device must be cpu or cuda, not '${device}'`);
  const policies = (values.policy ?? ['full']).map(parsePolicy);
  const turns = nonNegativeInteger('--turns', values.turns, 1);
  const seed = nonNegativeInteger('--seed', values.seed, 0);

  const { WORKLOADS } = await import('./eval/workload.js');
  const workload = values.workload ?? (values.trace === undefined ? 'needles-4k' : undefined);
  if (workload !== undefined && !Object.hasOwn(WORKLOADS, workload)) {
    throw new UsageError(`--workload must be one of ${Object.keys(WORKLOADS).join(', ')}, not '${workload}'`);
  }
  // The evaluator (and the native addon behind it) load only once the arguments are known good.
  const [{ evaluate }, { formatTable }, { renderHtml }, { readTrace }] = await Promise.all([
    import('./eval/evaluate.js'), import('./eval/report.js'), import('./eval/html.js'), import('./trace/trace.js'),
  ]);
  const source = workload ?? readTrace(values.trace as string);
  const started = performance.now();
  const interactive = process.stderr.isTTY === true;
  const reports: Report[] = [];
  for (const mode of modes as Array<'multi-turn' | 'multi-request'>) {
    reports.push(...evaluate({
      source, policies, mode, turns, seed, device,
      onProgress: ({ policy, stage, turn, turns: total }) => {
        const seconds = ((performance.now() - started) / 1000).toFixed(1);
        const what = { source: 'preparing the source', reference: 'exact reference', prefill: 'prefill', turn: `turn ${turn}/${total}` }[stage];
        const who = stage === 'source' ? '' : ` ${policy}`;
        process.stderr.write(`${interactive ? '\r\x1b[K' : ''}kvslim eval [${mode}]${who}: ${what} (${seconds} s)${interactive ? '' : '\n'}`);
      },
    }));
  }
  if (interactive) process.stderr.write('\r\x1b[K');
  process.stdout.write(formatTable(reports));
  process.stdout.write(`(${((performance.now() - started) / 1000).toFixed(1)} s)\n`);
  if (values.json !== undefined) {
    writeFileSync(values.json, JSON.stringify(reports, null, 2) + '\n');
    process.stdout.write(`wrote ${values.json}\n`);
  }
  if (values.html !== undefined) {
    writeFileSync(values.html, renderHtml(reports));
    process.stdout.write(`wrote ${values.html}\n`);
  }
  return 0;
}

/** A probability or share in [0, 1] given on the command line. */
function fraction(flag: string, text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  const value = Number(text);
  if (text.trim() === '' || !(value >= 0 && value <= 1)) throw new UsageError(`${flag} must be a number in [0, 1], not '${text}'`);
  return value;
}

/** Scores a trace's kv heads (scoreHeadsDetailed); prints a table, writes JSON; resolves to the exit status. */
async function scoreHeadsCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      trace: { type: 'string' }, sink: { type: 'string' }, window: { type: 'string' }, probes: { type: 'string' },
      'copy-segment': { type: 'string' }, ratio: { type: 'string' }, threshold: { type: 'string' }, device: { type: 'string', default: 'cpu' },
      json: { type: 'string' },
    },
  });
  if (values.trace === undefined) throw new UsageError('score-heads needs --trace');
  const sink = nonNegativeInteger('--sink', values.sink, 0) ?? 64;
  const window = nonNegativeInteger('--window', values.window, 1) ?? 256;
  const probes = nonNegativeInteger('--probes', values.probes, 1) ?? 64;
  const ratio = fraction('--ratio', values.ratio);
  const threshold = fraction('--threshold', values.threshold);
  if (ratio !== undefined && threshold !== undefined) throw new UsageError('give --ratio or --threshold, not both');
  const explicitSegment = nonNegativeInteger('--copy-segment', values['copy-segment'], 1);
  const device = values.device;
  if (device !== 'cpu' && device !== 'cuda') throw new UsageError(`--device must be cpu or cuda, not '${device}'`);

  const [{ readTrace }, { scoreHeadsDetailed }, { defaultRetrievalRatio, duoMask, resolveSelect }] = await Promise.all([
    import('./trace/trace.js'), import('./heads/score.js'), import('./select.js'),
  ]);
  const trace = readTrace(values.trace);
  const { layers, qHeads, kvHeads, headDim } = trace.meta.config;
  // A --probe trace names its segment; an explicit --copy-segment wins.
  const probe = trace.meta.probe as { length?: unknown } | undefined;
  const recorded = typeof probe?.length === 'number' && Number.isInteger(probe.length) && probe.length > 0 ? probe.length : undefined;
  const copySegment = explicitSegment ?? recorded;
  const T = trace.layers[0].k.length / (kvHeads * headDim);
  const interactive = process.stderr.isTTY === true;
  const started = performance.now();
  const result = scoreHeadsDetailed(trace, {
    sink, window, probes, copySegment, device,
    onProgress: ({ layer, layers: total }) => {
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      process.stderr.write(`${interactive ? '\r\x1b[K' : ''}kvslim score-heads: layer ${layer + 1}/${total} (${seconds} s)${interactive ? '' : '\n'}`);
    },
  });
  if (interactive) process.stderr.write('\r\x1b[K');
  const group = qHeads / kvHeads;
  const retrievalRatio = threshold === undefined ? ratio ?? defaultRetrievalRatio(group > 1) : null;
  // The choice a duo cache makes from this JSON (--policy duo:<file>), through the same option checks.
  const choice = resolveSelect({
    kind: 'duo', heads: result.scores, copyHeads: result.copyHeads, sink, window,
    ...(threshold === undefined ? { retrievalRatio } : { threshold }),
  }) as Extract<ResolvedSelect, { kind: 'duo' }>;
  const mask = duoMask(choice, layers, kvHeads, group > 1);
  const rule = threshold === undefined ? `at ratio ${retrievalRatio}` : `at threshold ${threshold}`;

  const lines: string[] = [];
  lines.push(`${values.trace}: ${layers} layers, ${qHeads} q / ${kvHeads} kv heads of ${headDim}, ${T} tokens; sink ${sink}, window ${window}, ` +
    `${result.probes[0]} probes per layer, copy score ${copySegment === undefined ? 'by the sequential-copy proxy' : `on the repeated ${copySegment}-token segment`}`);
  if (T - 1 < sink + window) {
    lines.push(`warning: every probe sees at most ${T} tokens, all inside sink + window (${sink + window}): no head has distant tokens, ` +
      'so every M is 0 and every E rounding only. Score with a longer trace, or the smaller sink and window you will deploy.');
  }
  const header = ['layer', 'kv head', 'score', 'E', 'M', 'R', 'role'];
  const rows: string[][] = [];
  const max = (values: Float32Array, layer: number, kvHead: number) => {
    let best = 0;
    for (let g = 0; g < group; g++) best = Math.max(best, values[layer * qHeads + kvHead * group + g]);
    return best;
  };
  const small = (x: number) => (x === 0 ? '0' : x < 1e-3 ? x.toExponential(2) : x.toFixed(4));
  for (let layer = 0; layer < layers; layer++) {
    for (let kvHead = 0; kvHead < kvHeads; kvHead++) {
      const index = layer * kvHeads + kvHead;
      rows.push([String(layer), String(kvHead), small(result.scores[index]), small(max(result.deviation, layer, kvHead)),
        small(max(result.distantMass, layer, kvHead)), max(result.copy, layer, kvHead).toFixed(2), mask[index] ? 'retrieval' : 'streaming']);
    }
  }
  const widths = header.map((title, column) => Math.max(title.length, ...rows.map((row) => row[column].length)));
  const line = (cells: string[]) => cells.map((cell, column) => (column === 6 ? cell : cell.padStart(widths[column]))).join('  ').trimEnd();
  lines.push(line(header), ...rows.map(line));
  const kept = mask.reduce((sum, m) => sum + m, 0);
  lines.push(`${kept} of ${layers * kvHeads} kv heads are retrieval heads ${rule} (${result.copyHeads.reduce((sum, c) => sum + c, 0)} copy heads, kept whatever the rule) ` +
    `(${((performance.now() - started) / 1000).toFixed(1)} s)`);
  process.stdout.write(`${lines.join('\n')}\n`);
  if (values.json !== undefined) {
    const perLayer = (values: ArrayLike<number>, width: number) =>
      Array.from({ length: layers }, (_, layer) => Array.from({ length: width }, (_, i) => values[layer * width + i]));
    const record = {
      format: 'kvslim-head-scores/1', trace: values.trace, layers, qHeads, kvHeads, headDim, tokens: T, sink, window,
      probes: result.probes, copyMode: result.copyMode, copySegment: copySegment ?? null, retrievalRatio, threshold: threshold ?? null,
      scores: perLayer(result.scores, kvHeads), copyHeads: perLayer(result.copyHeads, kvHeads).map((row) => row.map((c) => c === 1)), retrieval: perLayer(mask, kvHeads).map((row) => row.map((m) => m === 1)),
      deviation: perLayer(result.deviation, qHeads), distantMass: perLayer(result.distantMass, qHeads), copy: perLayer(result.copy, qHeads),
    };
    // One field per line, each array on its line.
    writeFileSync(values.json, `{\n${Object.entries(record).map(([key, value]) => `  ${JSON.stringify(key)}: ${JSON.stringify(value)}`).join(',\n')}\n}\n`);
    process.stdout.write(`wrote ${values.json}\n`);
  }
  return 0;
}

/** Lists a safetensors file's tensors and metadata; resolves to the exit status. */
async function inspect(argv: string[]): Promise<number> {
  const { positionals } = parseArgs({ args: argv, options: {}, allowPositionals: true });
  if (positionals.length !== 1) throw new UsageError(`inspect takes one file, received ${positionals.length}`);
  const [path] = positionals;
  const [{ readFileSync }, { readSafetensors }] = await Promise.all([import('node:fs'), import('./trace/safetensors.js')]);
  const { tensors, metadata } = readSafetensors(readFileSync(path));
  const rows = Object.entries(tensors).map(([name, t]) => [name, t.dtype, `[${t.shape.join(', ')}]`, String(t.data.byteLength)]);
  const header = ['tensor', 'dtype', 'shape', 'bytes'];
  const widths = header.map((title, column) => Math.max(title.length, ...rows.map((row) => row[column].length)));
  const line = (cells: string[]) => cells.map((cell, column) => (column === 3 ? cell.padStart(widths[column]) : cell.padEnd(widths[column]))).join('  ').trimEnd();
  const totalBytes = Object.values(tensors).reduce((sum, t) => sum + t.data.byteLength, 0);
  let text = `${path}: ${rows.length} tensors, ${totalBytes} bytes\n${[line(header), ...rows.map(line)].join('\n')}\n`;
  const entries = Object.entries(metadata);
  text += entries.length === 0 ? 'no metadata\n' : `metadata:\n${entries.map(([key, value]) => `  ${key}: ${value.length > 300 ? `${value.slice(0, 300)}... (${value.length} chars)` : value}`).join('\n')}\n`;
  process.stdout.write(text);
  return 0;
}

/** A command-line mistake: printed with the command's usage, exit status 2. */
class UsageError extends Error {}

/** Runs the compiled benchmark (dist/bench/main.js) in a child process with the given options. */
async function bench(argv: string[]): Promise<number> {
  const here = dirname(fileURLToPath(import.meta.url));
  // dist/lib/cli.js next to dist/bench/, or lib/cli.ts in a clone with dist/ built.
  const candidates = [join(here, '..', 'bench', 'main.js'), join(here, '..', 'dist', 'bench', 'main.js')];
  const script = candidates.find((path) => existsSync(path));
  if (script === undefined) {
    throw new KVSlimError('ERR_OPTION', `the benchmark is not built (looked for ${candidates.join(', ')}); run npm run build:ts`);
  }
  const child = spawnSync(process.execPath, [script, ...argv], { stdio: 'inherit' });
  return child.status ?? 1;
}

const commands: Record<string, (argv: string[]) => Promise<number>> = {
  trace, eval: evalCommand, evaluate: evalCommand, 'score-heads': scoreHeadsCommand, inspect, bench,
};

/** Runs the CLI on `argv` (without node and the script); resolves to the exit status. */
export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    if (command === undefined || command === 'help' || command === '--help' || command === '-h') {
      (command === undefined ? process.stderr : process.stdout).write(usage);
      return command === undefined ? 2 : 0;
    }
    if (Object.hasOwn(commands, command)) {
      if (rest.includes('--help') || rest.includes('-h')) {
        process.stdout.write(commandUsage[command]);
        return 0;
      }
      return await commands[command](rest);
    }
    throw new UsageError(`unknown command '${command}'`);
  } catch (error) {
    if (error instanceof UsageError || (error as { code?: string }).code?.startsWith('ERR_PARSE_ARGS')) {
      const help = command !== undefined && Object.hasOwn(commandUsage, command) ? commandUsage[command] : usage;
      process.stderr.write(`kvslim: ${(error as Error).message}\n\n${help}`);
      return 2;
    }
    const code = error instanceof KVSlimError ? ` [${error.code}]` : '';
    process.stderr.write(`kvslim${code}: ${(error as Error).message}\n`);
    return 1;
  }
}

/** True when node was started on this file (directly or through the npm bin link), not imported. */
function invokedDirectly(): boolean {
  const script = process.argv[1];
  if (script === undefined) return false;
  try {
    return realpathSync(script) === fileURLToPath(import.meta.url);
  } catch {
    return false;
  }
}

if (invokedDirectly()) process.exitCode = await main(process.argv.slice(2));
