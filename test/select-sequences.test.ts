// Selection policies under random call sequences: prefill, step (1 to 4 tokens), append and
// attend of random sizes, interleaved with fork() and a save() / KVCache.load() round trip, on
// caches of several shapes and page sizes. After every call each live cache's outputs and kept
// positions must equal its float64 reference's (test/reference/select.ts), and at the end its
// stats() bytes must be those of exactly what the reference keeps. The fixed plans of
// select.test.ts check each rule on its own; these look for rules that break each other (a fork
// taken mid-window, a reload between an h2o layer's steps, a second prefill after SnapKV chose).
import { describe, expect, it } from 'vitest';

import { KVCache } from '../lib/index.js';
import type { ReferenceSelectSpec, SelectShape } from './reference/select.js';
import { disposedAfterEach, held } from './helpers/lifetime.js';
import { Random } from './helpers/random.js';
import { type Op, Pair } from './helpers/select-pair.js';

const open = disposedAfterEach<KVCache>();

type Step = Op | ['fork'] | ['reload'];

const SHAPES: Array<[string, SelectShape, number]> = [
  ['GQA 8q/2kv d64, pages of 4', { layers: 2, qHeads: 8, kvHeads: 2, headDim: 64 }, 4],
  ['MHA 3q/3kv d40, pages of 5', { layers: 2, qHeads: 3, kvHeads: 3, headDim: 40 }, 5],
  ['MQA 4q/1kv d32, pages of 16', { layers: 3, qHeads: 4, kvHeads: 1, headDim: 32 }, 16],
];

/** Policies sized so that a plan of a few hundred tokens crosses every budget and window many times. */
function policies(shape: SelectShape): Array<[string, ReferenceSelectSpec]> {
  const heads = Array.from({ length: shape.layers * shape.kvHeads }, (_, i) => i % 3 !== 1);
  return [
    ['streaming', { kind: 'streaming', sink: 3, window: 11 }],
    ['streaming without sinks', { kind: 'streaming', sink: 0, window: 6 }],
    ['snapkv', { kind: 'snapkv', budget: 20, window: 5, kernel: 3, pooling: 'avg' }],
    ['pyramidkv', { kind: 'pyramidkv', budget: 18, window: 4, beta: 4 }],
    ['h2o', { kind: 'h2o', budget: 16, recent: 5 }],
    ['duo', { kind: 'duo', heads, sink: 2, window: 7 }],
  ];
}

/**
 * A call sequence: a first prefill longer than every policy's budget (sometimes after an append),
 * then `length` random steps.
 */
function randomPlan(random: Random, length: number): Step[] {
  const size = (most: number) => 1 + Math.floor(random.uniform() * most);
  const plan: Step[] = [];
  if (random.uniform() < 0.3) plan.push(['append', size(20)]);
  plan.push(['prefill', 30 + size(40)]);
  for (let i = 0; i < length; i++) {
    const u = random.uniform();
    if (u < 0.4) plan.push(['step', 1]);
    else if (u < 0.5) plan.push(['step', 1 + size(3)]);
    else if (u < 0.62) plan.push(['prefill', size(30)]);
    else if (u < 0.74) plan.push(['append', size(12)]);
    else if (u < 0.86) plan.push(['attend', 1]);
    else if (u < 0.93) plan.push(['fork']);
    else plan.push(['reload']);
  }
  return plan;
}

const describeStep = (step: Step) => (step.length === 1 ? step[0] : `${step[0]}(${step[1]})`);

describe('selection policies under random call sequences match the reference after every call', () => {
  for (const [shapeName, shape, pageTokens] of SHAPES) {
    for (const [policyName, select] of policies(shape)) {
      for (const seed of [1, 2]) {
        const name = `${policyName}, ${shapeName}, plan ${seed}`;
        it(name, () => {
          const random = new Random(1000 * seed + shapeName.length * 7 + policyName.length);
          const plan = randomPlan(random, 28);
          const live = [new Pair(open, shape, select, seed, pageTokens)];
          plan.forEach((step, index) => {
            const at = Math.floor(random.uniform() * live.length);
            const pair = live[at];
            const label = `${name}, call ${index} ${describeStep(step)} on cache ${at} of [${plan.slice(0, index + 1).map(describeStep).join(' ')}]`;
            if (step[0] === 'fork') {
              if (live.length < 3) live.push(pair.fork(seed * 100 + index));
              else live[at] = pair.fork(seed * 100 + index);
              live[live.length - 1].expectPositions(label);
            } else if (step[0] === 'reload') {
              const loaded = held(open, KVCache.load(pair.cache.save(), { device: 'cpu' }));
              live[at] = new Pair(open, shape, select, seed * 100 + index, pageTokens, loaded, pair.mirror);
              live[at].expectPositions(label);
            } else {
              // An empty layer has nothing to attend to (ERR_SHAPE, tested elsewhere).
              if (step[0] === 'attend' && pair.mirror.tokens(0) === 0) return;
              pair.run(step, label);
            }
          });
          for (const [i, pair] of live.entries()) pair.expectStats(`${name}, cache ${i} at the end`);
          // The plan reached past the policy's budget somewhere (a test that never evicts proves nothing).
          const evicted = live.some((pair) => pair.cache.stats().bytes.kv < pair.cache.stats().bytes.fullF16);
          expect(evicted, `${name}: some cache evicted`).toBe(true);
        });
      }
    }
  }
});
