#!/usr/bin/env node
// The `kvslim` command line. `kvslim trace` runs a llama2.c checkpoint over a prompt (the runner of
// lib/models/llama2c, loaded only for this command) and writes what each attention layer saw as a
// safetensors trace (lib/trace/trace.ts).
import { realpathSync } from 'node:fs';
import { basename } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { KVSlimError } from './errors.js';
import type { TraceLayer } from './trace/trace.js';

const usage = `Usage: kvslim <command> [options]

Commands:
  trace      run a llama2.c model over a prompt; write each layer's Q/K/V as a safetensors trace
  help       this text (also --help)

Planned, not available yet: evaluate, bench, score-heads

kvslim trace --model <model.bin> --tokenizer <tokenizer.bin> --prompt <text> [options]
  --model <path>        llama2.c checkpoint (legacy format)
  --tokenizer <path>    its tokenizer.bin
  --prompt <text>       the text to run (BOS and a dummy-prefix space are added, as llama2.c does)
  --out <path>          where to write the trace (default trace.safetensors)
  --steps <n>           greedy tokens to generate and record after the prompt (default 0)
  --store f32|f16|bf16  how the cache stores keys and values while tracing (default f32)
  --no-out              leave out layers.{i}.out (the attention outputs)

The trace holds, per layer i: layers.{i}.q [n, heads, headDim], layers.{i}.k and layers.{i}.v
[n, kvHeads, headDim] (q and k post-RoPE), layers.{i}.out like q; little-endian f32. Its
__metadata__ holds format, config (shapes, RoPE, model facts) and tokens (the n token ids).
`;

const planned = new Set(['evaluate', 'eval', 'bench', 'score-heads']);

/** Writes the trace of one prompt (plus `steps` greedy tokens); resolves to the exit status. */
async function trace(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      model: { type: 'string' }, tokenizer: { type: 'string' }, prompt: { type: 'string' },
      out: { type: 'string', default: 'trace.safetensors' }, steps: { type: 'string', default: '0' },
      store: { type: 'string', default: 'f32' }, 'no-out': { type: 'boolean', default: false },
    },
  });
  const { model: modelPath, tokenizer: tokenizerPath, prompt } = values;
  if (modelPath === undefined || tokenizerPath === undefined || prompt === undefined) {
    throw new UsageError('trace needs --model, --tokenizer and --prompt');
  }
  const steps = Number(values.steps);
  if (!Number.isInteger(steps) || steps < 0) throw new UsageError(`--steps must be an integer >= 0, not '${values.steps}'`);
  const store = values.store;
  if (store !== 'f32' && store !== 'f16' && store !== 'bf16') throw new UsageError(`--store must be f32, f16 or bf16, not '${store}'`);

  // The runner (and the native addon behind it) load only when a trace is asked for.
  const [{ readCheckpoint }, { Llama2 }, { Tokenizer }, { argmax }, { writeTrace }] = await Promise.all([
    import('./models/llama2c/checkpoint.js'), import('./models/llama2c/model.js'),
    import('./models/llama2c/tokenizer.js'), import('./models/llama2c/sampler.js'), import('./trace/trace.js'),
  ]);
  const model = new Llama2(readCheckpoint(modelPath));
  const { config } = model;
  const tokenizer = Tokenizer.read(tokenizerPath, config.vocabSize);
  const tokens = tokenizer.encode(prompt);
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
    prompt,
  });
  process.stdout.write(`wrote ${values.out}: ${config.layers} layers x ${tokens.length} tokens (${promptTokens} prompt + ${steps} generated)\n`);
  return 0;
}

/** A command-line mistake: printed with the usage, exit status 2. */
class UsageError extends Error {}

/** Runs the CLI on `argv` (without node and the script); resolves to the exit status. */
export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    if (command === undefined || command === 'help' || command === '--help' || command === '-h') {
      (command === undefined ? process.stderr : process.stdout).write(usage);
      return command === undefined ? 2 : 0;
    }
    if (command === 'trace') {
      if (rest.includes('--help') || rest.includes('-h')) {
        process.stdout.write(usage);
        return 0;
      }
      return await trace(rest);
    }
    if (planned.has(command)) {
      process.stderr.write(`kvslim ${command}: not available yet\n`);
      return 2;
    }
    throw new UsageError(`unknown command '${command}'`);
  } catch (error) {
    if (error instanceof UsageError || (error as { code?: string }).code?.startsWith('ERR_PARSE_ARGS')) {
      process.stderr.write(`kvslim: ${(error as Error).message}\n\n${usage}`);
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
