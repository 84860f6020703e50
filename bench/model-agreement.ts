// Token agreement of greedy generation with each cache policy against the exact (f32, full) cache,
// on a real llama2.c model. Usage:
//   npm run bench:model -- --model stories260K.bin --tokenizer tok512.bin [--tokens 200]
import { parseArgs } from 'node:util';

import type { PolicySpec } from '../lib/index.js';
import { readCheckpoint } from '../lib/models/llama2c/checkpoint.js';
import { generate } from '../lib/models/llama2c/generate.js';
import { Llama2 } from '../lib/models/llama2c/model.js';
import { Sampler } from '../lib/models/llama2c/sampler.js';
import { Tokenizer } from '../lib/models/llama2c/tokenizer.js';

const prompts = ['Once upon a time', 'The little dog', 'Tom and his sister went to the park', 'One day, a bird'];
// The stores (the f32 store is exact), then the eviction and loading policies at budgets well below
// the ~200 tokens generated, so they act during decode. The prompts are a few tokens, so
// SnapKV/PyramidKV (which select at the end of prefill) would keep everything and are left out;
// KIVI needs a group of 16+ channels dividing headDim (8 in stories260K).
const small = { sink: 4, window: 32 };
const policies: Array<{ name: string; policy: PolicySpec }> = [
  { name: 'full + f32', policy: { store: { kind: 'f32' } } },
  { name: 'full + f16', policy: { store: { kind: 'f16' } } },
  { name: 'full + bf16', policy: { store: { kind: 'bf16' } } },
  { name: 'streaming 4+60', policy: { select: { kind: 'streaming', sink: 4, window: 60 } } },
  { name: 'h2o 64', policy: { select: { kind: 'h2o', budget: 64 } } },
  { name: 'quest 2x16', policy: { select: { kind: 'quest', pages: 2, pageSize: 16, ...small } } },
  { name: 'flat 28', policy: { select: { kind: 'retrieval', index: 'flat', topK: 28, ...small } } },
  { name: 'graph 28', policy: { select: { kind: 'retrieval', index: 'graph', topK: 28, ...small } } },
  { name: 'actqkv 2x14', policy: { select: { kind: 'actqkv', blocks: 2, blockSize: 14, reprTopK: 4, ...small } } },
];

const { values } = parseArgs({
  options: { model: { type: 'string' }, tokenizer: { type: 'string' }, tokens: { type: 'string', default: '200' } },
});
if (values.model === undefined || values.tokenizer === undefined) {
  console.error('Usage: npm run bench:model -- --model <model.bin> --tokenizer <tokenizer.bin> [--tokens 200]');
  process.exit(2);
}
const maxTokens = Number(values.tokens);
const checkpoint = readCheckpoint(values.model);
const model = new Llama2(checkpoint);
const tokenizer = Tokenizer.read(values.tokenizer, checkpoint.config.vocabSize);

function run(policy: PolicySpec, prompt: string): number[] {
  const cache = model.createCache({ policy });
  try {
    return [...generate(model, cache, tokenizer.encode(prompt), { maxTokens, sampler: new Sampler() })];
  } finally {
    cache.dispose();
  }
}

const reference = prompts.map((prompt) => run(policies[0]!.policy, prompt));
console.log(`Greedy generation, ${maxTokens} tokens per prompt, ${prompts.length} prompts; reference: the exact f32 cache.`);
console.log('policy          agreement  first divergence (per prompt)');
for (const { name, policy } of policies) {
  let same = 0;
  let total = 0;
  const divergences: string[] = [];
  prompts.forEach((prompt, p) => {
    const tokens = run(policy, prompt);
    const expected = reference[p]!;
    const length = Math.max(tokens.length, expected.length);
    let first = -1;
    for (let i = 0; i < length; i++) {
      if (tokens[i] === expected[i]) same++;
      else if (first < 0) first = i;
    }
    total += length;
    divergences.push(first < 0 ? 'none' : String(first));
  });
  console.log(`${name.padEnd(15)} ${((100 * same) / total).toFixed(1).padStart(8)}%  ${divergences.join(', ')}`);
}
