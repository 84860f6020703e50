// PolicySpec (DESIGN.md): `select` decides which tokens are kept or loaded, `store` how kept tokens
// are encoded. This version implements select 'full' and stores f32 / f16 / bf16; the other kinds
// named by the design are recognised and rejected with a clear message until they land.
import { describe } from './errors.js';
import { knownKeys, optionError, plainObject } from './validate.js';

/** How kept tokens are stored. */
export type StoreSpec = { kind: 'f32' } | { kind: 'f16' } | { kind: 'bf16' };
/** Which tokens are kept and loaded. */
export type SelectSpec = { kind: 'full' };
/** A cache policy; omitted parts default to `{ kind: 'full' }` and `{ kind: 'f16' }`. */
export interface PolicySpec {
  select?: SelectSpec;
  store?: StoreSpec;
}

export interface ResolvedPolicy {
  select: SelectSpec;
  store: StoreSpec;
}

const plannedSelect = ['streaming', 'snapkv', 'pyramidkv', 'h2o', 'duo', 'quest', 'retrieval', 'actqkv'];

export function resolvePolicy(policy: unknown): ResolvedPolicy {
  if (policy === undefined) return { select: { kind: 'full' }, store: { kind: 'f16' } };
  const spec = plainObject('policy', policy);
  knownKeys('policy', spec, ['select', 'store', 'summary']);
  if (spec.summary !== undefined) throw optionError(`policy.summary is not available in this version of kvslim`);
  let select: SelectSpec = { kind: 'full' };
  if (spec.select !== undefined) {
    const s = plainObject('policy.select', spec.select);
    if (s.kind !== 'full') {
      const planned = typeof s.kind === 'string' && plannedSelect.includes(s.kind);
      throw optionError(
        `Expected 'full' for policy.select.kind but received ${describe(s.kind)}` +
          (planned ? ` (a planned policy not available in this version)` : ''),
      );
    }
    knownKeys('policy.select', s, ['kind']);
    select = { kind: 'full' };
  }
  let store: StoreSpec = { kind: 'f16' };
  if (spec.store !== undefined) {
    const s = plainObject('policy.store', spec.store);
    if (s.kind !== 'f32' && s.kind !== 'f16' && s.kind !== 'bf16') {
      throw optionError(
        `Expected 'f32', 'f16' or 'bf16' for policy.store.kind but received ${describe(s.kind)}` +
          (s.kind === 'kivi' ? ` (KIVI quantization is not available in this version)` : ''),
      );
    }
    knownKeys('policy.store', s, ['kind']);
    store = { kind: s.kind };
  }
  return { select, store };
}
