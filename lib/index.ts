/**
 * kvslim: a KV-cache engine for Node.js. Stores attention keys and values (paged, shareable
 * copy-on-write) and computes exact attention over them on the CPU (AVX-512 / AVX2 / scalar,
 * multi-threaded) or a CUDA GPU.
 */
export { attention, attentionScores, type AttentionOptions, type AttentionScoresOptions } from './attention.js';
export { backends, setThreads, type Backends, type Device } from './backends.js';
export { hostMemory, releaseHostMemory, type HostMemory } from './host-memory.js';
export { KVCache, type CallOptions, type KVCacheOptions, type LoadOptions } from './cache.js';
export { KVSlimError, type KVSlimErrorCode } from './errors.js';
export {
  createKeyIndex, KeyIndex, pageBounds, type KeyIndexOptions, type PageBoundsOptions, type SearchHits, type SearchOptions,
} from './key-index.js';
export type { KiviStoreSpec, PolicySpec, ResolvedPolicy, SelectSpec, StoreSpec } from './policy.js';
export type { ActQKVSpec, IndexSpec, QuestSpec, RetrievalSpec } from './select.js';
export { dequantize, quantize, type QuantizedTensor, type QuantizeOptions } from './quantize.js';
export { probeMachine, type MachineLimits } from './probes.js';
export type { CacheStats } from './stats.js';
export type { Dtype, Tensor } from './validate.js';
export {
  readSafetensors, writeSafetensors, type SafetensorsData, type SafetensorsDtype, type SafetensorsFile, type SafetensorsTensor,
} from './trace/safetensors.js';
export {
  encodeTrace, readTrace, TRACE_FORMAT, writeTrace, type Trace, type TraceConfig, type TraceLayer, type TraceMeta,
} from './trace/trace.js';
export { evaluate, traceSource, type EvaluateOptions } from './eval/evaluate.js';
export {
  generateWorkload, WORKLOADS, type EvalSource, type WorkloadConfig, type WorkloadSpec, type WorkloadTurn,
} from './eval/workload.js';
export {
  formatTable, REPORT_SCHEMA, type Report, type TurnFidelity, type TurnLatency, type TurnMemory, type TurnReport,
} from './eval/report.js';
export { renderHtml } from './eval/html.js';
export { headProbe, type HeadProbeOptions } from './heads/probe.js';
export {
  COPY_THRESHOLD, scoreHeads, scoreHeadsDetailed, type HeadScoreLayer, type HeadScores, type ScoreHeadsOptions,
} from './heads/score.js';
