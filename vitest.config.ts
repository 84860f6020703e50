import { defineConfig } from 'vitest/config';

// Forks, one at a time. The addon is not safe to load from several worker threads of one process
// (see test/workers.test.ts: its error factory is process-global, so a native error raised after
// a second thread loaded it aborts the process), which rules out the 'threads' pool. One fork at
// a time because the addon's thread pool already uses every core, and setThreads(),
// probeMachine() and stats().timeMs tests should not contend with another file.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    pool: 'forks',
    maxWorkers: 1,
    fileParallelism: false,
    reporters: ['default'],
  },
});
