// A C++ exception that escapes the core (which reports failures as Status, so only a bug throws)
// must reach JavaScript as a KVSlimError ERR_INTERNAL, never abort the process. The worst route is
// a thread-pool task on a worker thread: the pool rethrows it on the calling thread, the N-API
// entry points (errors.h guarded) and the async workers turn it into ERR_INTERNAL.
// KVSLIM_TEST_THROW_IN_TASK (read once) injects such a throw, so the check runs in a child process.
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';

import { ensureCompiled, repositoryRoot } from './helpers/dist.js';

describe('an escaped C++ exception', () => {
  beforeAll(() => ensureCompiled());

  it('thrown on a pool worker, is ERR_INTERNAL for sync and async calls, and later calls work', () => {
    const child = join(repositoryRoot, 'test/fixtures/throw-child.mjs');
    const env = { ...process.env, KVSLIM_TEST_THROW_IN_TASK: '2' };
    const stdout = execFileSync(process.execPath, [child], { env, encoding: 'utf8', timeout: 60_000 });
    const result = JSON.parse(stdout.trim().split('\n').at(-1) ?? '');
    for (const call of ['sync', 'async']) {
      expect(result[call], call).toEqual({
        name: 'KVSlimError', code: 'ERR_INTERNAL', message: 'internal error (a C++ exception): KVSLIM_TEST_THROW_IN_TASK',
      });
    }
    // 21 tokens: the failed calls appended theirs before attention threw (a bug's state, reported, not repaired).
    expect(result.after).toEqual({ tokens: 21, finite: true, same: true });
  });
});
