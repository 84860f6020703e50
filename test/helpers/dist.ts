// Child processes load the compiled package (dist/), since they cannot import TypeScript.
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const repositoryRoot = fileURLToPath(new URL('../..', import.meta.url));

/** Compiles lib/ to dist/ (tsc -p tsconfig.json) when dist is missing or older than a source file. */
export function ensureCompiled(): void {
  const lib = join(repositoryRoot, 'lib');
  const stale = readdirSync(lib)
    .filter((name) => name.endsWith('.ts'))
    .some((name) => {
      const output = join(repositoryRoot, 'dist/lib', name.replace(/\.ts$/, '.js'));
      return !existsSync(output) || statSync(output).mtimeMs < statSync(join(lib, name)).mtimeMs;
    });
  if (!stale) return;
  try {
    execFileSync(process.execPath, [join(repositoryRoot, 'node_modules/typescript/bin/tsc'), '-p', 'tsconfig.json'], {
      cwd: repositoryRoot, stdio: 'pipe',
    });
  } catch {
    // Type errors elsewhere (bench/) still emit lib/; the check below is what matters.
  }
  if (!existsSync(join(repositoryRoot, 'dist/lib/index.js'))) throw new Error('tsc did not produce dist/lib/index.js');
}
