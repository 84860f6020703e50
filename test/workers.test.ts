// kvslim in several threads of one process (worker_threads): each thread's native errors must
// reach it as its own KVSlimError (native/napi/errors.cc keeps the error factory per addon
// instance), and a worker that exits must not take the main thread's error path with it.
// Runs in a child process, so that a crash fails this test instead of the test runner.
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';

import { ensureCompiled, repositoryRoot } from './helpers/dist.js';

beforeAll(() => ensureCompiled());

describe('worker threads', () => {
  it('native errors on the main thread and in a worker are KVSlimErrors, and nothing crashes', () => {
    const result = spawnSync(process.execPath, [join(repositoryRoot, 'test/fixtures/worker-errors.mjs')], {
      encoding: 'utf8', timeout: 30_000,
    });
    const lines = result.stdout.trim().split('\n').filter(Boolean).map((line) => JSON.parse(line) as Record<string, unknown>);
    const expected = (where: string) => ({ where, name: 'KVSlimError', code: 'ERR_CORRUPT', isKVSlimError: true });
    expect(lines, result.stderr.split('\n').slice(0, 3).join('\n')).toEqual([
      expected('main, worker alive'), expected('worker'), expected('main, worker exited'),
    ]);
    expect(result.signal).toBeNull();
    expect(result.status).toBe(0);
  });
});
