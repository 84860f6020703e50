// PolicySpec (DESIGN.md): `select` decides which tokens are kept or loaded, `store` how kept tokens
// are encoded. This version implements the selections of lib/select.ts and stores f32 / f16 /
// bf16 / KIVI; the other kinds named by the design are rejected with a clear message until they land.
import { describe } from './errors.js';
import { type ResolvedSelect, resolveSelect, type SelectSpec } from './select.js';
import { knownKeys, optionalPositiveInteger, optionError, plainObject } from './validate.js';

export type { SelectSpec } from './select.js';

/**
 * KIVI quantization (methods/kivi.md): keys per channel in groups of `group` tokens, values per
 * token in groups of `group` channels, asymmetric 2/4/8-bit codes with f16 scale and min. The keys
 * since the last multiple of `residual` tokens and the last `residual` values stay in f16.
 */
export interface KiviStoreSpec {
  kind: 'kivi';
  bits: 2 | 4 | 8;
  /** Tokens per key group and channels per value group: a multiple of 16 dividing headDim; default 32. */
  group?: number;
  /** Full-precision residual length R: a multiple of group; default 128. */
  residual?: number;
  /**
   * KVQuant dense-and-sparse: the fraction of each vector kept exactly, in [0, 1]; default 0 (off),
   * e.g. 0.01. Per key group record (group tokens x headDim) the round(outliers * group * headDim)
   * largest-|x| entries, per value token the round(outliers * headDim) largest-|x| channels are left
   * out of min/max and stored as (uint16 index, f16 delta to their dequantized value), 4 bytes each.
   * Needs group * headDim <= 65536. CPU only (the CUDA backend rejects it with ERR_BACKEND_UNAVAILABLE).
   */
  outliers?: number;
  /**
   * KVQuant pre-RoPE keys; default false. Needs the cache's `rope` option. `append`/`step`/`prefill`
   * then take keys BEFORE the rotary embedding (token t of a layer is at position t, the index it is
   * appended at); keys are quantized pre-RoPE per channel (outlier channels stay put) and attention
   * rotates each dequantized key by its position before the dot with the (post-RoPE) query. Values
   * are unaffected. CPU only (the CUDA backend rejects it with ERR_BACKEND_UNAVAILABLE).
   */
  preRope?: boolean;
}
/** How kept tokens are stored. */
export type StoreSpec = { kind: 'f32' } | { kind: 'f16' } | { kind: 'bf16' } | KiviStoreSpec;
/**
 * A cache policy; omitted parts default to `{ kind: 'full' }` and `{ kind: 'f16' }`. With the KIVI
 * store, `select` may be snapkv or pyramidkv (the kept tokens are quantized after the selection),
 * streaming or duo (every token is quantized; the window evicts one run per head, which the store
 * skips and whose whole pages it releases) or h2o (a layer is quantized at its first call with
 * queries, its prompt's prefill() or a step(); later evictions are masked, and the layer is
 * compacted, requantizing what stays, once max(`residual`, `budget` / 8) of them per head are
 * flagged, or from half that in turn with the other layers); the loading policies need a dense
 * store.
 */
export interface PolicySpec {
  select?: SelectSpec;
  store?: StoreSpec;
}

export interface ResolvedPolicy {
  select: ResolvedSelect;
  store: { kind: 'f32' } | { kind: 'f16' } | { kind: 'bf16' } | Required<KiviStoreSpec>;
}

export function resolvePolicy(policy: unknown): ResolvedPolicy {
  if (policy === undefined) return { select: { kind: 'full' }, store: { kind: 'f16' } };
  const spec = plainObject('policy', policy);
  knownKeys('policy', spec, ['select', 'store', 'summary']);
  if (spec.summary !== undefined) throw optionError(`policy.summary is not available in this version of kvslim`);
  const select = resolveSelect(spec.select);
  let store: ResolvedPolicy['store'] = { kind: 'f16' };
  if (spec.store !== undefined) {
    const s = plainObject('policy.store', spec.store);
    if (s.kind === 'kivi') {
      knownKeys('policy.store', s, ['kind', 'bits', 'group', 'residual', 'outliers', 'preRope']);
      if (s.bits !== 2 && s.bits !== 4 && s.bits !== 8) {
        throw optionError(`Expected 2, 4 or 8 for policy.store.bits but received ${describe(s.bits)}`);
      }
      const group = optionalPositiveInteger('policy.store.group', s.group, 32, 1 << 20);
      const residual = optionalPositiveInteger('policy.store.residual', s.residual, 128, 1 << 20);
      if (group % 16 !== 0) throw optionError(`Expected a multiple of 16 for policy.store.group but received ${group}`);
      if (residual % group !== 0) {
        throw optionError(`Expected a multiple of group (${group}) for policy.store.residual but received ${residual}`);
      }
      const outliers = s.outliers === undefined ? 0 : s.outliers;
      if (typeof outliers !== 'number' || !Number.isFinite(outliers) || outliers < 0 || outliers > 1) {
        throw optionError(`Expected a fraction in [0, 1] for policy.store.outliers but received ${describe(s.outliers)}`);
      }
      const preRope = s.preRope === undefined ? false : s.preRope;
      if (typeof preRope !== 'boolean') {
        throw optionError(`Expected a boolean for policy.store.preRope but received ${describe(s.preRope)}`);
      }
      store = { kind: 'kivi', bits: s.bits, group, residual, outliers, preRope };
    } else {
      if (s.kind !== 'f32' && s.kind !== 'f16' && s.kind !== 'bf16') {
        throw optionError(`Expected 'f32', 'f16', 'bf16' or 'kivi' for policy.store.kind but received ${describe(s.kind)}`);
      }
      knownKeys('policy.store', s, ['kind']);
      store = { kind: s.kind };
    }
  }
  if (select.kind !== 'full' && store.kind === 'kivi') {
    // KIVI quantizes keys in groups of tokens: it holds what a policy keeps once the policy stops
    // evicting (SnapKV and PyramidKV, after their one selection at prefill), or when the policy
    // evicts one run of tokens per head (streaming and duo: the store skips a hole).
    const windowed = select.kind === 'streaming' || select.kind === 'duo';
    if (select.kind !== 'snapkv' && select.kind !== 'pyramidkv' && select.kind !== 'h2o' && !windowed) {
      throw optionError(
        `policy.select '${select.kind}' cannot be combined with store 'kivi': only snapkv and pyramidkv (which select ` +
          `once at prefill, before the kept tokens are quantized), streaming and duo (whose windows evict one run of ` +
          `tokens per head) and h2o (whose evictions attention masks until the layer is compacted) can; a policy that ` +
          `loads single tokens anywhere needs a dense store`,
      );
    }
    if (select.kind === 'streaming' && select.positions === 'cache') {
      throw optionError(`policy.select.positions 'cache' cannot be combined with store 'kivi'`);
    }
    if (store.preRope && !windowed) {
      throw optionError(
        `policy.store.preRope cannot be combined with policy.select '${select.kind}': pre-RoPE keys are rotated by their ` +
          `index in the store, which eviction changes`,
      );
    }
  }
  return { select, store };
}
