// Text generation with a llama2.c model on a kvslim cache: the decode loop, and a CLI around it.
//   node dist/lib/models/llama2c/generate.js --model stories260K.bin --tokenizer tok512.bin --prompt "Once upon a time"
import { realpathSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { type KVCache, KVSlimError } from '../../index.js';
import { readCheckpoint } from './checkpoint.js';
import { Llama2 } from './model.js';
import { Sampler } from './sampler.js';
import { BOS, EOS, Tokenizer } from './tokenizer.js';

/** Why generation ended: maxTokens reached, a stop token sampled, or the model's context full. */
export type FinishReason = 'length' | 'stop' | 'context';

export interface GenerateOptions {
  /** Tokens to sample at most. */
  maxTokens: number;
  sampler: Sampler;
  /** Tokens that end generation (yielded, never fed); default BOS and EOS, as llama2.c does. */
  stopTokens?: readonly number[];
}

/**
 * Feeds `prompt` (one or more ids) through the model after what `cache` already holds, then
 * samples up to `maxTokens` tokens, yielding each as soon as it is chosen; returns why it stopped.
 * Each yielded token is fed to the cache before the next one is sampled, except the last: a caller
 * that continues the sequence later passes it at the head of its next prompt.
 */
export function* generate(
  model: Llama2, cache: KVCache, prompt: readonly number[], options: GenerateOptions,
): Generator<number, FinishReason, void> {
  const { maxTokens, sampler, stopTokens = [BOS, EOS] } = options;
  let logits = model.forward(cache, prompt);
  for (let produced = 1; produced <= maxTokens; produced++) {
    const token = sampler.sample(logits);
    yield token;
    if (stopTokens.includes(token)) return 'stop';
    if (produced === maxTokens) break;
    if (cache.tokens(0) >= model.config.seqLen) return 'context';
    logits = model.forward(cache, [token]);
  }
  return 'length';
}

/** True when the module at `moduleUrl` is the script node was started with (not an import). */
export function runsAsScript(moduleUrl: string): boolean {
  const script = process.argv[1];
  if (script === undefined) return false;
  try {
    return realpathSync(script) === fileURLToPath(moduleUrl);
  } catch {
    return false;
  }
}

const usage = `Usage: generate --model <model.bin> --tokenizer <tokenizer.bin> [options]

Generates text with a llama2.c checkpoint; attention runs on a kvslim KVCache.

  --model <path>          llama2.c checkpoint (legacy format), e.g. stories260K.bin
  --tokenizer <path>      llama2.c tokenizer.bin for that model, e.g. tok512.bin
  --prompt <text>         text to continue (default: empty, a story from scratch)
  --steps <n>             tokens to generate at most (default 256; stops early at the model's context)
  --temperature <t>       0 = greedy (default); > 0 samples from softmax(logits / t)
  --seed <n>              seed of the sampler (default 0); same seed, same text
  --store f32|f16|bf16    how the cache stores keys and values (default f16)
  --help                  this text
`;

/** The CLI: prints the prompt and its continuation to stdout, throughput and cache size to stderr. */
export function main(argv: string[]): number {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        model: { type: 'string' }, tokenizer: { type: 'string' }, prompt: { type: 'string', default: '' },
        steps: { type: 'string', default: '256' }, temperature: { type: 'string', default: '0' },
        seed: { type: 'string', default: '0' }, store: { type: 'string', default: 'f16' }, help: { type: 'boolean' },
      },
    }));
  } catch (error) {
    process.stderr.write(`generate: ${(error as Error).message}\n\n${usage}`);
    return 2;
  }
  if (values.help) {
    process.stdout.write(usage);
    return 0;
  }
  const steps = Number(values.steps);
  const temperature = Number(values.temperature);
  const seed = Number(values.seed);
  const store = values.store;
  const problems = [
    values.model === undefined && '--model is required',
    values.tokenizer === undefined && '--tokenizer is required',
    !(Number.isInteger(steps) && steps >= 0) && `--steps must be an integer >= 0, not '${values.steps}'`,
    !(Number.isFinite(temperature) && temperature >= 0) && `--temperature must be a number >= 0, not '${values.temperature}'`,
    !Number.isSafeInteger(seed) && `--seed must be an integer, not '${values.seed}'`,
    store !== 'f32' && store !== 'f16' && store !== 'bf16' && `--store must be f32, f16 or bf16, not '${store}'`,
  ].filter((problem): problem is string => typeof problem === 'string');
  if (problems.length > 0) {
    process.stderr.write(`generate: ${problems.join('; ')}\n\n${usage}`);
    return 2;
  }

  let cache: KVCache | undefined;
  try {
    const model = new Llama2(readCheckpoint(values.model as string));
    const tokenizer = Tokenizer.read(values.tokenizer as string, model.config.vocabSize);
    const prompt = tokenizer.encode(values.prompt);
    if (prompt.length > model.config.seqLen) {
      throw new KVSlimError('ERR_SHAPE', `The prompt is ${prompt.length} tokens; the model's context is ${model.config.seqLen}`);
    }
    cache = model.createCache({ policy: { store: { kind: store as 'f32' | 'f16' | 'bf16' } } });
    process.stdout.write(tokenizer.decodeText(prompt));

    const decoder = new TextDecoder();
    let previous = prompt[prompt.length - 1];
    let generated = 0;
    const started = performance.now();
    const tokens = generate(model, cache, prompt, { maxTokens: steps, sampler: new Sampler({ temperature, seed }) });
    for (let next = tokens.next(); !next.done; next = tokens.next()) {
      const token = next.value;
      generated++;
      if (token !== BOS && token !== EOS) process.stdout.write(decoder.decode(tokenizer.decode(token, previous), { stream: true }));
      previous = token;
    }
    process.stdout.write(`${decoder.decode()}\n`);
    const seconds = (performance.now() - started) / 1000;
    const stats = cache.stats();
    process.stderr.write(
      `${generated} tokens in ${seconds.toFixed(2)} s (${(generated / seconds).toFixed(1)} tok/s); ` +
        `cache: ${cache.tokens(0)} tokens x ${model.config.layers} layers, ${stats.bytes.total} bytes (${store})\n`,
    );
    return 0;
  } catch (error) {
    const code = error instanceof KVSlimError ? ` [${error.code}]` : '';
    process.stderr.write(`generate${code}: ${(error as Error).message}\n`);
    return 1;
  } finally {
    cache?.dispose();
  }
}

if (runsAsScript(import.meta.url)) {
  // Piped into head: stop quietly when the reader goes away.
  process.stdout.on('error', (error: NodeJS.ErrnoException) => {
    if (error.code === 'EPIPE') process.exit(0);
    throw error;
  });
  process.exitCode = main(process.argv.slice(2));
}
