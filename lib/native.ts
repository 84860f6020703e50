// The only file that touches the compiled addon. It loads it (prebuild or local build), hands it
// the KVSlimError factory, and sizes the thread pool.
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { KVSlimError, type KVSlimErrorCode } from './errors.js';
import type { SelectSpec } from './select.js';

export type NativeDtype = 'f32' | 'f16' | 'bf16';
export type NativeTensor = Float32Array | Uint16Array;

export interface NativeStats {
  tokens: { seen: number; kept: number; loaded: number };
  bytes: {
    kv: number; residual: number; index: number; summary: number; meta: number;
    fullF16: number; allocated: number; shared: number;
  };
  timeMs: { prefill: number; compress: number; indexBuild: number; retrieve: number; decode: number };
  layers: Array<{ tokensKept: number[]; bytes: number }>;
}

/** createCache's select options: every field present (lib/cache.ts fills the unused ones). */
export interface NativeSelect {
  kind: string; sink: number; window: number; budget: number; kernel: number; pooling: 'max' | 'avg'; beta: number;
  recent: number; retrieval: Uint8Array; cachePositions: boolean;
  pageSize: number; pages: number; topK: number; trainQueries: number; index: NativeIndexOptions;
  blockSize: number; blocks: number; reprTopK: number; queryWindow: number; questionWeight: number; temperature: number;
}

export interface NativeIndexOptions {
  kind: 'flat' | 'ivf' | 'graph'; dim: number; lists: number; probes: number; degree: number; beam: number;
  neighbors: number; threads: number; seed: number;
  /** ivf, graph: keep the keys as f16 (createKeyIndex's keyType; a cache sets it itself for an f16 store). */
  halfKeys?: boolean;
}

export interface NativeKeyIndex {
  add(keys: Float32Array): void;
  search(queries: Float32Array, k: number, probes: number, beam: number): { ids: Uint32Array; scores: Float32Array; scanned: number };
  size(): number;
  bytes(): number;
  dispose(): void;
}

export interface NativeCache {
  append(layer: number, k: NativeTensor, v: NativeTensor, dtype: NativeDtype): void;
  attend(layer: number, q: NativeTensor, dtype: NativeDtype, out?: Float32Array): Float32Array;
  step(layer: number, q: NativeTensor, k: NativeTensor, v: NativeTensor, dtype: NativeDtype, out?: Float32Array): Float32Array;
  prefill(layer: number, q: NativeTensor, k: NativeTensor, v: NativeTensor, dtype: NativeDtype, out?: Float32Array): Float32Array;
  attendAsync(layer: number, q: NativeTensor, dtype: NativeDtype, out?: Float32Array): Promise<Float32Array>;
  stepAsync(
    layer: number, q: NativeTensor, k: NativeTensor, v: NativeTensor, dtype: NativeDtype, out?: Float32Array,
  ): Promise<Float32Array>;
  prefillAsync(
    layer: number, q: NativeTensor, k: NativeTensor, v: NativeTensor, dtype: NativeDtype, out?: Float32Array,
  ): Promise<Float32Array>;
  fork(): NativeCache;
  stats(): NativeStats;
  save(): Buffer;
  saveAsync(): Promise<Buffer>;
  tokens(layer: number): number;
  truncate(layer: number, tokens: number): void;
  positions(layer: number, kvHead: number, loaded?: boolean): Float64Array;
  config(): {
    layers: number; qHeads: number; kvHeads: number; headDim: number; store: NativeDtype; pageTokens: number;
    scale: number; storeKind: 'dense' | 'kivi'; kiviBits: number; kiviGroup: number; kiviResidual: number;
    kiviOutliers: number; kiviPreRope: boolean; ropeTheta: number; ropeStyle: 'adjacent' | 'half';
    /** The selection policy's options, as a SelectSpec (absent for 'full'). */
    select?: SelectSpec;
  };
  dispose(): void;
}

export interface NativeBackends {
  cpu: {
    simd: 'scalar' | 'avx2' | 'avx512'; avx2: boolean; avx512: boolean; forced: string | null; threads: number;
    vendor: string; prefetch: 'l1' | 'l2';
  };
  cuda: {
    built: boolean; available: boolean; reason: string; devices: number; name: string;
    computeCapability: string; memoryBytes: number; runtimeVersion: number; driverVersion: number;
    architectures: string;
  };
}

interface Addon {
  setErrorFactory(factory: (code: string, message: string) => Error): void;
  simdError(): string | null;
  backends(): NativeBackends;
  setThreads(threads: number): void;
  hostMemory(): { pagesMapped: number; pagesIdle: number; scratch: number };
  releaseHostMemory(): number;
  attention(options: {
    q: NativeTensor; k: NativeTensor; v: NativeTensor; dtype: NativeDtype; qHeads: number; kvHeads: number;
    headDim: number; causal: boolean; scale: number; device: string; threads: number; out?: Float32Array;
  }): Float32Array;
  attentionScores(options: {
    q: NativeTensor; k: NativeTensor; dtype: NativeDtype; qHeads: number; kvHeads: number; headDim: number;
    kvHead: number; scale: number; device: string; threads: number; outCount: number; out?: Float32Array;
  }): Float32Array;
  createCache(options: {
    layers: number; qHeads: number; kvHeads: number; headDim: number; store: NativeDtype; pageTokens: number;
    scale: number; threads: number; device: string; storeKind: 'dense' | 'kivi'; kiviBits: number;
    kiviGroup: number; kiviResidual: number; kiviOutliers: number; kiviPreRope: boolean; select: NativeSelect; ropeTheta: number; ropeStyle: 'adjacent' | 'half';
  }): NativeCache;
  NativeKeyIndex: new (options: NativeIndexOptions, keys: Float32Array, queries: Float32Array | undefined) => NativeKeyIndex;
  pageBounds(dim: number, pageSize: number, keys: Float32Array, queries: Float32Array): Float32Array;
  quantize(options: {
    x: NativeTensor; dtype: NativeDtype; channels: number; axis: string; bits: number; group: number;
  }): { tokens: number; codes: Uint32Array; scales: Float32Array; zeros: Float32Array };
  dequantize(options: {
    axis: string; bits: number; group: number; channels: number; tokens: number; codes: Uint32Array;
    scales: Float32Array; zeros: Float32Array;
  }): Float32Array;
  loadCache(buffer: Uint8Array, device: string, threads: number): NativeCache;
  loadCacheAsync(buffer: Uint8Array, device: string, threads: number): Promise<NativeCache>;
  stepBatch(
    caches: NativeCache[], layer: number, q: NativeTensor, k: NativeTensor, v: NativeTensor, dtype: NativeDtype, out?: Float32Array,
  ): Float32Array;
  stepBatchAsync(
    caches: NativeCache[], layer: number, q: NativeTensor, k: NativeTensor, v: NativeTensor, dtype: NativeDtype, out?: Float32Array,
  ): Promise<Float32Array>;
  probeBandwidth(megabytes: number, threads: number, repeats: number): number;
  probeFmaPeak(threads: number, repeats: number): number;
}

/** The package root: lib/ when run from source, dist/lib/ when compiled. */
function findPackageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'binding.gyp'))) {
    const parent = dirname(dir);
    if (parent === dir) return dirname(fileURLToPath(import.meta.url));
    dir = parent;
  }
  return dir;
}

const packageRoot = findPackageRoot();

function loadAddon(): Addon {
  const require = createRequire(import.meta.url);
  const attempts: string[] = [];
  const explicit = process.env.KVSLIM_ADDON;
  if (explicit) {
    try {
      return require(explicit) as Addon;
    } catch (error) {
      attempts.push(`KVSLIM_ADDON=${explicit}: ${(error as Error).message}`);
    }
  }
  try {
    // Prebuilds first, then build/Release: the order node-gyp-build defines.
    const nodeGypBuild = require('node-gyp-build') as (dir: string) => Addon;
    return nodeGypBuild(packageRoot);
  } catch (error) {
    attempts.push(`${packageRoot} (prebuilds/, build/Release/): ${(error as Error).message.split('\n')[0]}`);
  }
  throw new KVSlimError(
    'ERR_ADDON_LOAD',
    `kvslim could not load its native addon.\n  Tried:\n    ${attempts.join('\n    ')}\n` +
      `  Rebuild it with:  npm rebuild kvslim   (or, in a clone: npm run build:native)\n` +
      `  Building needs python3, make and a C++17 compiler; set KVSLIM_CUDA=off to skip the CUDA backend.`,
  );
}

export const addon: Addon = loadAddon();

addon.setErrorFactory((code, message) => new KVSlimError(code as KVSlimErrorCode, message));

const simdProblem = addon.simdError();
if (simdProblem !== null) throw new KVSlimError('ERR_OPTION', simdProblem);

/** Threads of the native pool: KVSLIM_THREADS, else os.availableParallelism(). */
function initialThreads(): number {
  const fromEnv = process.env.KVSLIM_THREADS;
  if (fromEnv === undefined || fromEnv === '') return availableParallelism();
  const threads = Number(fromEnv);
  if (!Number.isInteger(threads) || threads < 1 || threads > 1024) {
    throw new KVSlimError('ERR_OPTION', `KVSLIM_THREADS must be an integer in [1, 1024], but is '${fromEnv}'`);
  }
  return threads;
}

addon.setThreads(initialThreads());
