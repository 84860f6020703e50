/**
 * What a cache holds and what it cost (SCBench-style), from {@link KVCache.stats}.
 * Token counts are means over layers (and kv heads); bytes are summed over layers.
 */
export interface CacheStats {
  tokens: {
    /** Tokens appended so far (mean over layers). */
    seen: number;
    /** Tokens stored (mean over layers x kv heads). */
    kept: number;
    /** Tokens read by the last attention call (mean over kv heads). */
    loaded: number;
  };
  bytes: {
    /** Keys and values of kept tokens, as stored. */
    kv: number;
    /** Full-precision residual tokens of quantized stores. */
    residual: number;
    /** Retrieval indexes. */
    index: number;
    /** Summaries of evicted tokens. */
    summary: number;
    /** Page tables and other bookkeeping. */
    meta: number;
    /** kv + residual + index + summary + meta. */
    total: number;
    /** The same tokens in a plain f16 cache. */
    fullF16: number;
    /** Page memory reserved (whole pages, the unfilled tail of the last page included). */
    allocated: number;
    /** Page memory shared copy-on-write with forks or the parent. */
    shared: number;
  };
  /** bytes.total / bytes.fullF16 (SCBench's tau); 0 for an empty cache. */
  compressionRatio: number;
  /** Milliseconds per lifecycle stage, accumulated over the cache's life (a fork starts from its parent's). */
  timeMs: { prefill: number; compress: number; indexBuild: number; retrieve: number; decode: number };
  /** Per layer: tokens kept per kv head, and bytes of K and V. */
  layers: Array<{ tokensKept: number[]; bytes: number }>;
}
