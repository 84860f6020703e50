// Next-token choice: greedy (temperature 0) or a draw from softmax(logits / temperature), from a
// seeded generator so the same seed gives the same text.
import { KVSlimError } from '../../index.js';

export interface SamplerOptions {
  /** 0 (default) picks the most likely token; higher values flatten the distribution. */
  temperature?: number;
  /** Seed of the random draws (an integer; default 0). Ignored when greedy. */
  seed?: number;
}

/** Index of the largest value (the first one on ties). */
export function argmax(values: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

export class Sampler {
  readonly temperature: number;
  #state: number;

  constructor(options: SamplerOptions = {}) {
    const { temperature = 0, seed = 0 } = options;
    if (typeof temperature !== 'number' || !Number.isFinite(temperature) || temperature < 0) {
      throw new KVSlimError('ERR_OPTION', `Expected a finite number >= 0 for temperature but received ${String(temperature)}`);
    }
    if (!Number.isSafeInteger(seed)) {
      throw new KVSlimError('ERR_OPTION', `Expected an integer for seed but received ${String(seed)}`);
    }
    this.temperature = temperature;
    this.#state = seed >>> 0;
  }

  /** The next token id given the logits of the last position. */
  sample(logits: ArrayLike<number>): number {
    if (this.temperature === 0) return argmax(logits);
    // Softmax in float64 with the maximum subtracted, then invert the cumulative distribution.
    const max = logits[argmax(logits)];
    const weights = new Float64Array(logits.length);
    let sum = 0;
    for (let i = 0; i < logits.length; i++) {
      weights[i] = Math.exp((logits[i] - max) / this.temperature);
      sum += weights[i];
    }
    const target = this.#uniform() * sum;
    let cumulative = 0;
    for (let i = 0; i < weights.length; i++) {
      cumulative += weights[i];
      if (target < cumulative) return i;
    }
    return argmax(logits); // rounding left target at the very top: the likeliest token
  }

  /** mulberry32: uniform in [0, 1), a 32-bit state, same seed same sequence. */
  #uniform(): number {
    this.#state = (this.#state + 0x6d2b79f5) >>> 0;
    let t = this.#state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
}
