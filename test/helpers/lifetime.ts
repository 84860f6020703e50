// Native objects a test opens, disposed when it ends (pass or fail), so a failing test does not
// leave its caches' memory to the next.
import { afterEach } from 'vitest';

/** `item`, pushed onto `open` (a disposedAfterEach array) so it is disposed when the test ends. */
export function held<T>(open: T[], item: T): T {
  open.push(item);
  return item;
}

/** An array whose entries are disposed after each test of the file that calls this. */
export function disposedAfterEach<T extends { dispose(): void }>(): T[] {
  const open: T[] = [];
  afterEach(() => {
    for (const item of open.splice(0)) item.dispose();
  });
  return open;
}
