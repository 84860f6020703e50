import { type Device } from './backends.js';
import { describe, KVSlimError } from './errors.js';
import { addon, type NativeCache, type NativeDtype, type NativeSelect } from './native.js';
import { type PolicySpec, type ResolvedPolicy, resolvePolicy } from './policy.js';
import { duoMask, type ResolvedSelect } from './select.js';
import type { CacheStats } from './stats.js';
import {
  type Dtype, knownKeys, oneOf, optionError, outputArray, plainObject, positiveInteger, positiveNumber, rowsOf,
  sharedDtype, type Tensor,
} from './validate.js';

/** Options of {@link KVCache}. */
export interface KVCacheOptions {
  /** Transformer layers; each has its own keys and values. */
  layers: number;
  /** Query heads. */
  qHeads: number;
  /** Key/value heads (GQA: `qHeads` must be a multiple). */
  kvHeads: number;
  /** Elements per head (at most 1024). */
  headDim: number;
  /** Default `auto`: CUDA when a GPU answers, else the CPU. */
  device?: Device;
  /** Threads each call may use, at most the pool size (default: the whole pool; see setThreads). */
  threads?: number;
  /** What to keep and how to store it; default `{ select: { kind: 'full' }, store: { kind: 'f16' } }`. */
  policy?: PolicySpec;
  /** Tokens per storage page (per layer and kv head); default 64. */
  pageTokens?: number;
  /** Softmax scale; default `1 / sqrt(headDim)`. */
  scale?: number;
  /**
   * The model's rotary embedding, for policies that need it (StreamingLLM `positions: 'cache'`):
   * base `theta` and pair layout (`adjacent`: (2i, 2i+1) as in Llama/llama2.c; `half`: (i, i + headDim/2)).
   */
  rope?: { theta: number; style?: 'adjacent' | 'half' };
}

/** Per-call options. */
export interface CallOptions {
  /** Element type of the call's tensors: required for Uint16Array inputs (`f16` or `bf16`). */
  dtype?: Dtype;
  /**
   * Write the output here instead of a new array: a Float32Array of `n * qHeads * headDim`
   * that shares no memory with the inputs. Reusing one across steps avoids an allocation (and,
   * for a long prefill, page faults) per call.
   */
  out?: Float32Array;
}

/** Options of {@link KVCache.load} and {@link KVCache.loadAsync}. */
export interface LoadOptions {
  /** Where the loaded cache lives (default 'auto': CUDA when it is available). */
  device?: Device;
  /** Worker threads of the loaded cache's calls (default: the machine's). */
  threads?: number;
}

// An async call's error with the stack of its call site, not of the native completion callback.
function withCallSite(error: unknown, callSite: Error): unknown {
  if (error instanceof Error && callSite.stack) {
    error.stack = `${error.name}: ${error.message}\n${callSite.stack.split('\n').slice(1).join('\n')}`;
  }
  return error;
}

// load()/loadAsync() arguments, checked on the calling thread.
function loadArguments(bytes: unknown, options: LoadOptions): { device: 'cpu' | 'cuda'; threads: number } {
  if (!(bytes instanceof Uint8Array)) {
    throw optionError('Expected a Buffer or Uint8Array for KVCache.load');
  }
  const o = plainObject('KVCache.load options', options);
  knownKeys('KVCache.load', o, ['device', 'threads']);
  const requested = o.device === undefined ? 'auto' : oneOf('device', o.device, ['auto', 'cpu', 'cuda'] as const);
  const device = requested === 'auto' ? (addon.backends().cuda.available ? 'cuda' : 'cpu') : requested;
  const threads = o.threads === undefined ? 0 : positiveInteger('threads', o.threads, 1024);
  return { device, threads };
}

// The store part of createCache's options.
function nativeStore(store: ResolvedPolicy['store']) {
  if (store.kind === 'kivi') {
    return {
      store: 'f16' as const, storeKind: 'kivi' as const, kiviBits: store.bits, kiviGroup: store.group,
      kiviResidual: store.residual, kiviOutliers: store.outliers, kiviPreRope: store.preRope,
    };
  }
  return {
    store: store.kind, storeKind: 'dense' as const, kiviBits: 0, kiviGroup: 0, kiviResidual: 0, kiviOutliers: 0,
    kiviPreRope: false,
  };
}

// The select part of createCache's options: every field present, duo heads as a retrieval mask.
function nativeSelect(select: ResolvedSelect, layers: number, kvHeads: number, gqa: boolean): NativeSelect {
  const none: NativeSelect = {
    kind: select.kind, sink: 0, window: 0, budget: 0, kernel: 1, pooling: 'max', beta: 1, recent: 0, retrieval: new Uint8Array(0),
    cachePositions: false, pageSize: 1, pages: 1, topK: 1, trainQueries: 1,
    index: { kind: 'flat', dim: 1, lists: 0, probes: 0, degree: 32, beam: 0, neighbors: 100, threads: 0, seed: 1 },
    blockSize: 1, blocks: 1, reprTopK: 1, queryWindow: 1, questionWeight: 0, temperature: 1,
  };
  switch (select.kind) {
    case 'full': return none;
    case 'streaming': return { ...none, sink: select.sink, window: select.window, cachePositions: select.positions === 'cache' };
    case 'snapkv': case 'pyramidkv':
      return { ...none, budget: select.budget, window: select.window, kernel: select.kernel, pooling: select.pooling, beta: select.beta };
    case 'h2o': return { ...none, budget: select.budget, recent: select.recent };
    case 'duo': return { ...none, sink: select.sink, window: select.window, retrieval: duoMask(select, layers, kvHeads, gqa) };
    case 'quest': return { ...none, sink: select.sink, window: select.window, pageSize: select.pageSize, pages: select.pages };
    case 'retrieval':
      return {
        ...none, sink: select.sink, window: select.window, topK: select.topK, trainQueries: select.trainQueries,
        index: { ...select.index, dim: 1 },
      };
    case 'actqkv':
      return {
        ...none, sink: select.sink, window: select.window, blockSize: select.blockSize, blocks: select.blocks,
        reprTopK: select.reprTopK, queryWindow: select.queryWindow, questionWeight: select.questionWeight,
        temperature: select.temperature,
      };
  }
}

const cacheKeys = ['layers', 'qHeads', 'kvHeads', 'headDim', 'device', 'threads', 'policy', 'pageTokens', 'scale', 'rope'] as const;

function ropeOf(value: unknown): { ropeTheta: number; ropeStyle: 'adjacent' | 'half' } {
  if (value === undefined) return { ropeTheta: 0, ropeStyle: 'adjacent' };
  const rope = plainObject('rope', value);
  knownKeys('rope', rope, ['theta', 'style']);
  return {
    ropeTheta: positiveNumber('rope.theta', rope.theta),
    ropeStyle: rope.style === undefined ? 'adjacent' : oneOf('rope.style', rope.style, ['adjacent', 'half'] as const),
  };
}

/**
 * The KV cache of one sequence. Keys and values are appended per layer (`[n, kvHeads, headDim]`),
 * queries attend causally over everything appended (`[n, qHeads, headDim]`, query i of n sees
 * positions `<= T - n + i`), outputs are `Float32Array`s `[n, qHeads, headDim]`.
 *
 * Synchronous calls run on the caller's thread (using the native pool); the `*Async` variants run
 * off the event loop, in call order per cache. A synchronous call while an async one is pending
 * throws `ERR_BUSY`.
 */
export class KVCache {
  readonly layers: number;
  readonly qHeads: number;
  readonly kvHeads: number;
  readonly headDim: number;
  /** The device the cache lives on. */
  readonly device: 'cpu' | 'cuda';
  readonly policy: ResolvedPolicy;
  readonly #policySpec: PolicySpec | undefined;
  readonly #rope: KVCacheOptions['rope'];
  readonly #threads: number;
  #native: NativeCache | null;
  #tail: Promise<unknown> = Promise.resolve();
  #pending = 0;
  #disposeWhenIdle = false;

  constructor(options: KVCacheOptions);
  /** @internal used by fork() and load() */
  constructor(options: KVCacheOptions, native: NativeCache, device: 'cpu' | 'cuda');
  constructor(options: KVCacheOptions, native?: NativeCache, device?: 'cpu' | 'cuda') {
    const o = plainObject('KVCache options', options);
    knownKeys('KVCache', o, cacheKeys);
    this.layers = positiveInteger('layers', o.layers, 65536);
    this.qHeads = positiveInteger('qHeads', o.qHeads);
    this.kvHeads = positiveInteger('kvHeads', o.kvHeads);
    this.headDim = positiveInteger('headDim', o.headDim, 1024);
    if (this.qHeads % this.kvHeads !== 0) {
      throw optionError(`Expected qHeads to be a multiple of kvHeads but received qHeads=${this.qHeads}, kvHeads=${this.kvHeads}`);
    }
    this.policy = resolvePolicy(o.policy);
    this.#policySpec = o.policy as PolicySpec | undefined;
    this.#rope = o.rope as KVCacheOptions['rope'];
    this.#threads = o.threads === undefined ? 0 : positiveInteger('threads', o.threads, 1024);
    const requested = o.device === undefined ? 'auto' : oneOf('device', o.device, ['auto', 'cpu', 'cuda'] as const);
    if (native !== undefined && device !== undefined) {
      this.#native = native;
      this.device = device;
      return;
    }
    if (this.policy.store.kind === 'kivi' && this.policy.store.preRope && o.rope === undefined) {
      throw optionError('policy.store.preRope needs the cache\'s rope option ({ theta, style }): keys are rotated in attention');
    }
    this.device = requested === 'auto' ? (addon.backends().cuda.available ? 'cuda' : 'cpu') : requested;
    this.#native = addon.createCache({
      layers: this.layers, qHeads: this.qHeads, kvHeads: this.kvHeads, headDim: this.headDim,
      ...nativeStore(this.policy.store),
      select: nativeSelect(this.policy.select, this.layers, this.kvHeads, this.qHeads > this.kvHeads),
      ...ropeOf(o.rope),
      pageTokens: o.pageTokens === undefined ? 64 : positiveInteger('pageTokens', o.pageTokens, 1 << 20),
      scale: o.scale === undefined ? 0 : positiveNumber('scale', o.scale),
      threads: this.#threads,
      device: this.device,
    });
  }

  /** Appends n tokens to one layer. `k`, `v`: `[n, kvHeads, headDim]`. */
  append(layer: number, k: Tensor, v: Tensor, options?: CallOptions): void {
    const dtype = this.#checkKV(layer, k, v, options);
    this.#idle('append').append(layer, k, v, dtype);
  }

  /** n queries `[n, qHeads, headDim]` attend causally over the layer's tokens. */
  attend(layer: number, q: Tensor, options?: CallOptions): Float32Array {
    const dtype = this.#checkQuery(layer, q, options);
    const out = outputArray(options?.out, q.length, { q });
    return this.#idle('attend').attend(layer, q, dtype, out);
  }

  /** Appends n tokens and lets their n queries attend (the decode hot path: one native call). */
  step(layer: number, q: Tensor, k: Tensor, v: Tensor, options?: CallOptions): Float32Array {
    const dtype = this.#checkStep(layer, q, k, v, options);
    const out = outputArray(options?.out, q.length, { q, k, v });
    return this.#idle('step').step(layer, q, k, v, dtype, out);
  }

  /**
   * One decode step of many caches in one call (a server's batch of sequences): cache i appends
   * token i of `k`, `v` (`[n, kvHeads, headDim]`) and attends with token i of `q`
   * (`[n, qHeads, headDim]`); row i of the result (`[n, qHeads, headDim]`) is what
   * `caches[i].step(layer, ...)` would return, bit for bit. The caches must be distinct, of one
   * shape and on one device. Every input is checked before any cache changes. On the CPU, with at
   * least as many caches as threads, the caches step in parallel, one thread each: a batch of
   * short sequences keeps every core busy without a thread hand-off per cache and layer.
   */
  static stepBatch(caches: readonly KVCache[], layer: number, q: Tensor, k: Tensor, v: Tensor, options?: CallOptions): Float32Array {
    const { dtype, out } = KVCache.#checkBatch(caches, layer, q, k, v, options);
    const natives = caches.map((cache) => cache.#idle('stepBatch'));
    return addon.stepBatch(natives, layer, q, k, v, dtype, out);
  }

  /**
   * {@link stepBatch} off the event loop. It runs once every cache's earlier async calls are done,
   * and each cache's later calls wait for it (sync calls meanwhile throw `ERR_BUSY`). Keep the
   * arrays unchanged until the promise settles.
   */
  static stepBatchAsync(caches: readonly KVCache[], layer: number, q: Tensor, k: Tensor, v: Tensor, options?: CallOptions): Promise<Float32Array> {
    const { dtype, out } = KVCache.#checkBatch(caches, layer, q, k, v, options);
    return KVCache.#queue(caches, 'stepBatchAsync', (natives) => addon.stepBatchAsync(natives, layer, q, k, v, dtype, out));
  }

  // stepBatch's arguments, checked on the calling thread: distinct caches of one shape, one token each.
  static #checkBatch(caches: readonly KVCache[], layer: number, q: Tensor, k: Tensor, v: Tensor, options?: CallOptions) {
    if (!Array.isArray(caches) || caches.length === 0) throw optionError('Expected a non-empty array of KVCache for stepBatch');
    caches.forEach((cache, i) => {
      if (!(cache instanceof KVCache)) throw optionError(`Expected caches[${i}] to be a KVCache but received ${describe(cache)}`);
      if (caches.indexOf(cache) !== i) throw optionError(`caches[${i}] appears twice in the batch`);
    });
    const [first] = caches;
    const dtype = first.#checkStep(layer, q, k, v, options);
    if (q.length !== caches.length * first.qHeads * first.headDim) {
      throw new KVSlimError('ERR_SHAPE', `Expected q to hold one token per cache (${caches.length} x ${first.qHeads} x ${first.headDim} elements) but received ${q.length}`);
    }
    caches.forEach((cache, i) => {
      if (cache.qHeads !== first.qHeads || cache.kvHeads !== first.kvHeads || cache.headDim !== first.headDim) {
        throw new KVSlimError('ERR_SHAPE', `Expected caches[${i}] to have the shape of caches[0] (qHeads, kvHeads, headDim)`);
      }
      cache.#checkLayer(layer);
    });
    return { dtype, out: outputArray(options?.out, q.length, { q, k, v }) };
  }

  /** Like step, for the prompt: timed as prefill, and query-aware policies observe q. */
  prefill(layer: number, q: Tensor, k: Tensor, v: Tensor, options?: CallOptions): Float32Array {
    const dtype = this.#checkStep(layer, q, k, v, options);
    const out = outputArray(options?.out, q.length, { q, k, v });
    return this.#idle('prefill').prefill(layer, q, k, v, dtype, out);
  }

  /** {@link attend} off the event loop. Keep q unchanged until the promise settles. */
  attendAsync(layer: number, q: Tensor, options?: CallOptions): Promise<Float32Array> {
    const dtype = this.#checkQuery(layer, q, options);
    const out = outputArray(options?.out, q.length, { q });
    return this.#enqueue((native) => native.attendAsync(layer, q, dtype, out));
  }

  /** {@link step} off the event loop. Keep the arrays unchanged until the promise settles. */
  stepAsync(layer: number, q: Tensor, k: Tensor, v: Tensor, options?: CallOptions): Promise<Float32Array> {
    const dtype = this.#checkStep(layer, q, k, v, options);
    const out = outputArray(options?.out, q.length, { q, k, v });
    return this.#enqueue((native) => native.stepAsync(layer, q, k, v, dtype, out));
  }

  /** {@link prefill} off the event loop. Keep the arrays unchanged until the promise settles. */
  prefillAsync(layer: number, q: Tensor, k: Tensor, v: Tensor, options?: CallOptions): Promise<Float32Array> {
    const dtype = this.#checkStep(layer, q, k, v, options);
    const out = outputArray(options?.out, q.length, { q, k, v });
    return this.#enqueue((native) => native.prefillAsync(layer, q, k, v, dtype, out));
  }

  /**
   * A new cache sharing this one's tokens copy-on-write (shared context, multi-request serving):
   * appending to either never changes the other. Costs one page table, not a copy of the cache.
   */
  fork(): KVCache {
    const native = this.#idle('fork').fork();
    return new KVCache(this.#options(), native, this.device);
  }

  /** Tokens held by one layer (ERR_BUSY while an async call, which may append, is pending). */
  tokens(layer: number): number {
    this.#checkLayer(layer);
    return this.#idle('tokens').tokens(layer);
  }

  /**
   * Drops one layer's newest tokens so that it holds `tokens` (0 .. tokens(layer)): the rejected
   * drafts of a speculative step. Pages past the new end are freed (or left to the forks that
   * share them). Only for `select: 'full'` over a dense store (f32, f16, bf16): a policy's state
   * already reflects the newest tokens, so fork before them and drop the fork instead.
   */
  truncate(layer: number, tokens: number): void {
    this.#checkLayer(layer);
    if (typeof tokens !== 'number' || !Number.isInteger(tokens) || tokens < 0 || tokens > 2 ** 31 - 1) {
      throw new KVSlimError('ERR_SHAPE', `Expected tokens to be a non-negative integer but received ${describe(tokens)}`);
    }
    this.#idle('truncate').truncate(layer, tokens);
  }

  /**
   * Absolute positions of the tokens one kv head of a layer keeps, ascending (a selection policy
   * keeps a subset of `0 .. tokens(layer) - 1`; positions are never renumbered).
   */
  positions(layer: number, kvHead: number): Float64Array {
    this.#checkHead(layer, kvHead);
    return this.#idle('positions').positions(layer, kvHead, false);
  }

  /**
   * Absolute positions of the tokens the last attention call of a layer read in one kv head,
   * ascending: the static part plus what a loading policy (quest, retrieval, actqkv) chose, or
   * every kept token when the call attended densely.
   */
  loadedPositions(layer: number, kvHead: number): Float64Array {
    this.#checkHead(layer, kvHead);
    return this.#idle('loadedPositions').positions(layer, kvHead, true);
  }

  #checkHead(layer: number, kvHead: number): void {
    this.#checkLayer(layer);
    if (!Number.isInteger(kvHead) || kvHead < 0 || kvHead >= this.kvHeads) {
      throw new KVSlimError('ERR_SHAPE', `Expected kvHead to be an integer in [0, ${this.kvHeads - 1}] but received ${String(kvHead)}`);
    }
  }

  /** Token counts, bytes by part and time per lifecycle stage. */
  stats(): CacheStats {
    const s = this.#idle('stats').stats();
    const total = s.bytes.kv + s.bytes.residual + s.bytes.index + s.bytes.summary + s.bytes.meta;
    return {
      tokens: s.tokens,
      bytes: { ...s.bytes, total },
      compressionRatio: s.bytes.fullF16 > 0 ? total / s.bytes.fullF16 : 0,
      timeMs: s.timeMs,
      layers: s.layers,
    };
  }

  /**
   * The cache as bytes (config, tokens in stored form, the policy's state, checksum); see
   * {@link KVCache.load}: the loaded cache goes on exactly as this one would.
   */
  save(): Buffer {
    return this.#idle('save').save();
  }

  /**
   * {@link save} off the event loop (a long cache takes a while to copy and checksum). Queued
   * after the cache's pending async calls; calls made meanwhile wait for it.
   */
  saveAsync(): Promise<Buffer> {
    return this.#enqueue((native) => native.saveAsync());
  }

  /** A cache from {@link save} output. Malformed or damaged bytes throw `ERR_CORRUPT`. */
  static load(bytes: Uint8Array, options: LoadOptions = {}): KVCache {
    const { device, threads } = loadArguments(bytes, options);
    return KVCache.#loaded(addon.loadCache(bytes, device, threads), device, threads);
  }

  /**
   * {@link load} off the event loop; rejects with `ERR_CORRUPT` for malformed or damaged bytes.
   * Keep `bytes` unchanged until the promise settles.
   */
  static loadAsync(bytes: Uint8Array, options: LoadOptions = {}): Promise<KVCache> {
    const { device, threads } = loadArguments(bytes, options);
    return addon.loadCacheAsync(bytes, device, threads).then((native) => KVCache.#loaded(native, device, threads));
  }

  static #loaded(native: NativeCache, device: 'cpu' | 'cuda', threads: number): KVCache {
    try {
      return KVCache.#fromConfig(native, device, threads);
    } catch (error) {
      native.dispose();
      // Saved options that the native loader accepts but the typed API does not (a damaged index
      // seed past 2^31 - 1, say) are damage too, not the caller's option.
      if (error instanceof KVSlimError && error.code === 'ERR_OPTION') {
        throw new KVSlimError('ERR_CORRUPT', `cannot load cache: a saved option is out of range (${error.message})`, { cause: error });
      }
      throw error;
    }
  }

  static #fromConfig(native: NativeCache, device: 'cpu' | 'cuda', threads: number): KVCache {
    const config = native.config();  // the native side owns the save format
    return new KVCache(
      {
        layers: config.layers, qHeads: config.qHeads, kvHeads: config.kvHeads, headDim: config.headDim,
        threads: threads === 0 ? undefined : threads,
        policy: {
          ...(config.select === undefined ? {} : { select: config.select }),
          store: config.storeKind === 'kivi'
            ? {
              kind: 'kivi', bits: config.kiviBits as 2 | 4 | 8, group: config.kiviGroup, residual: config.kiviResidual,
              outliers: config.kiviOutliers, ...(config.kiviPreRope ? { preRope: true } : {}),
            }
            : { kind: config.store },
        },
        // preRope keys and streaming 'cache' positions need the rope; otherwise it is unused.
        ...(config.ropeTheta > 0 ? { rope: { theta: config.ropeTheta, style: config.ropeStyle } } : {}),
      },
      native,
      device,
    );
  }

  /**
   * Frees the cache's memory now (otherwise the garbage collector does). Later calls throw
   * `ERR_DISPOSED`. Pending async calls finish first.
   */
  dispose(): void {
    const native = this.#native;
    if (native === null || this.#disposeWhenIdle) return;
    if (this.#pending > 0) {
      this.#disposeWhenIdle = true;
      void this.#tail.then(() => this.#release());
      return;
    }
    this.#release();
  }

  /** True once dispose() was called. */
  get disposed(): boolean {
    return this.#native === null || this.#disposeWhenIdle;
  }

  #release(): void {
    this.#native?.dispose();
    this.#native = null;
  }

  #options(): KVCacheOptions {
    return {
      layers: this.layers, qHeads: this.qHeads, kvHeads: this.kvHeads, headDim: this.headDim,
      threads: this.#threads === 0 ? undefined : this.#threads, policy: this.#policySpec, rope: this.#rope,
    };
  }

  #live(method: string): NativeCache {
    if (this.#native === null || this.#disposeWhenIdle) {
      throw new KVSlimError('ERR_DISPOSED', `Cannot call ${method}() on a disposed KVCache`);
    }
    return this.#native;
  }

  #queued(): NativeCache {
    if (this.#native === null) throw new KVSlimError('ERR_DISPOSED', 'The KVCache was disposed before this async call ran');
    return this.#native;
  }

  #idle(method: string): NativeCache {
    const native = this.#live(method);
    if (this.#pending > 0) {
      throw new KVSlimError('ERR_BUSY', `Cannot call ${method}() while ${this.#pending} async call(s) are pending on this KVCache; await them first`);
    }
    return native;
  }

  #enqueue<T>(run: (native: NativeCache) => Promise<T>): Promise<T> {
    return KVCache.#queue([this], 'async call', ([native]) => run(native));
  }

  /**
   * Queues an async call on every cache of `caches`: it runs once each cache's earlier async calls
   * are done, and each cache's later ones wait for it. A call queued before dispose() still runs:
   * dispose() releases a cache once its queue drains.
   */
  static #queue<T>(caches: readonly KVCache[], method: string, run: (natives: NativeCache[]) => Promise<T>): Promise<T> {
    for (const cache of caches) cache.#live(method);
    // Errors get the stack of the call site, not of the native completion callback.
    const callSite = new Error();
    for (const cache of caches) cache.#pending++;
    const settle = () => {
      for (const cache of caches) cache.#pending--;
    };
    const ready = caches.length === 1 ? caches[0].#tail : Promise.all(caches.map((cache) => cache.#tail));
    const result = ready.then(() => run(caches.map((cache) => cache.#queued()))).then(
      (value) => {
        settle();
        return value;
      },
      (error: unknown) => {
        settle();
        throw withCallSite(error, callSite);
      },
    );
    const tail = result.catch(() => undefined);
    for (const cache of caches) cache.#tail = tail;
    return result;
  }

  #checkLayer(layer: unknown): void {
    if (typeof layer !== 'number' || !Number.isInteger(layer) || layer < 0 || layer >= this.layers) {
      throw new KVSlimError('ERR_SHAPE', `Expected layer to be an integer in [0, ${this.layers - 1}] but received ${String(layer)}`);
    }
  }

  #checkQuery(layer: number, q: Tensor, options?: CallOptions): NativeDtype {
    this.#checkLayer(layer);
    const dtype = sharedDtype({ q }, options?.dtype);
    rowsOf('q', q, this.qHeads, this.headDim, 'qHeads');
    return dtype;
  }

  #checkKV(layer: number, k: Tensor, v: Tensor, options?: CallOptions): NativeDtype {
    this.#checkLayer(layer);
    const dtype = sharedDtype({ k, v }, options?.dtype);
    this.#kvRows(k, v);
    return dtype;
  }

  /** Tokens in k (`[n, kvHeads, headDim]`), with v of the same length. */
  #kvRows(k: Tensor, v: Tensor): number {
    const n = rowsOf('k', k, this.kvHeads, this.headDim, 'kvHeads');
    if (v.length !== k.length) {
      throw new KVSlimError('ERR_SHAPE', `Expected v to hold as many elements as k (${k.length}) but received ${v.length}`);
    }
    return n;
  }

  #checkStep(layer: number, q: Tensor, k: Tensor, v: Tensor, options?: CallOptions): NativeDtype {
    this.#checkLayer(layer);
    const dtype = sharedDtype({ q, k, v }, options?.dtype);
    const n = rowsOf('q', q, this.qHeads, this.headDim, 'qHeads');
    const kvN = this.#kvRows(k, v);
    if (n !== kvN) {
      throw new KVSlimError('ERR_SHAPE', `Expected q and k to hold the same number of tokens but q holds ${n} and k holds ${kvN}`);
    }
    return dtype;
  }
}
