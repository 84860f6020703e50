// Native objects a test opens, disposed when it ends (pass or fail), so a failing test does not
// leave its caches' memory to the next.
import { afterEach } from 'vitest';

/** An array whose entries are disposed after each test of the file that calls this. */
export function disposedAfterEach<T extends { dispose(): void }>(): T[] {
  const open: T[] = [];
  afterEach(() => {
    for (const item of open.splice(0)) item.dispose();
  });
  return open;
}
