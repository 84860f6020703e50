// Runs the kvslim CLI (lib/cli.ts main) in-process with stdout and stderr captured.
import { vi } from 'vitest';

import { main } from '../../lib/cli.js';

export async function runCli(argv: string[]): Promise<{ status: number; stdout: string; stderr: string }> {
  let stdout = '', stderr = '';
  const text = (chunk: string | Uint8Array) => (typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString());
  const out = vi.spyOn(process.stdout, 'write').mockImplementation((chunk) => ((stdout += text(chunk)), true));
  const err = vi.spyOn(process.stderr, 'write').mockImplementation((chunk) => ((stderr += text(chunk)), true));
  try {
    return { status: await main(argv), stdout, stderr };
  } finally {
    out.mockRestore();
    err.mockRestore();
  }
}
