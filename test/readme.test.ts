// The README's TypeScript example must compile against the real API (STYLE.md: examples compile).
import { readFileSync, mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

import ts from 'typescript';
import { describe, expect, it } from 'vitest';

const root = resolve(__dirname, '..');

function typeScriptBlocks(markdown: string): string[] {
  return [...markdown.matchAll(/```ts\n([\s\S]*?)```/g)].map((match) => match[1] as string);
}

describe('README', () => {
  const blocks = typeScriptBlocks(readFileSync(join(root, 'README.md'), 'utf8'));

  it('has a TypeScript usage example', () => {
    expect(blocks.length).toBeGreaterThan(0);
  });

  it.each(blocks.map((code, index) => [index, code] as const))('example %i type-checks against lib/', (_index, code) => {
    const dir = mkdtempSync(join(tmpdir(), 'kvslim-readme-'));
    try {
      const file = join(dir, 'example.ts');
      writeFileSync(file, code.replaceAll("from 'kvslim'", `from '${join(root, 'lib', 'index.js')}'`));
      const program = ts.createProgram([file], {
        strict: true, noEmit: true, target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.NodeNext,
        moduleResolution: ts.ModuleResolutionKind.NodeNext, types: ['node'], skipLibCheck: true,
        typeRoots: [join(root, 'node_modules', '@types')],
      });
      const diagnostics = ts.getPreEmitDiagnostics(program).map((d) => ts.flattenDiagnosticMessageText(d.messageText, '\n'));
      expect(diagnostics).toEqual([]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
