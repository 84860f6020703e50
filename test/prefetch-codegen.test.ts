// The streaming kernels keep their software prefetches in the built addon. GCC deletes the calls
// of an out-of-line function whose only effect is prefetching; when a prefetch helper was left to
// the inliner and went out of line, the 64K-token decode ran 2x slower cold and no output changed.
// So every compiled instance of these kernels must contain prefetch instructions. Reads the addon
// with binutils (nm, objdump); skipped where they are missing or the addon has no symbols.
import { execFileSync } from 'node:child_process';
import { createRequire } from 'node:module';

import { describe, expect, it } from 'vitest';

import { repositoryRoot } from './helpers/dist.js';

/** Kernels whose every instance streams memory it asked for ahead (native/cpu/*.inl). */
const KERNELS = ['decodeRangeRows', 'scoreRangeRows', 'kiviDecodeRows', 'prefillTileRows', 'maxDotGather'] as const;

interface KernelSymbol { name: string; start: number; end: number }

function tool(command: string, args: string[]): string | null {
  try {
    return execFileSync(command, args, { encoding: 'utf8', maxBuffer: 1 << 30 });
  } catch {
    return null;
  }
}

function addonPath(): string {
  if (process.env.KVSLIM_ADDON) return process.env.KVSLIM_ADDON;
  const nodeGypBuild = createRequire(import.meta.url)('node-gyp-build') as { path(dir: string): string };
  return nodeGypBuild.path(repositoryRoot);
}

/** The kernels' symbols (demangled), with their address ranges. */
function kernelSymbols(addon: string): KernelSymbol[] | null {
  const listing = tool('nm', ['-C', '-S', '--defined-only', addon]);
  if (listing === null) return null;
  const symbols: KernelSymbol[] = [];
  for (const line of listing.split('\n')) {
    const match = /^([0-9a-f]+) ([0-9a-f]+) [tTwW] (.*)$/.exec(line);
    if (!match) continue;
    const name = match[3];
    if (!KERNELS.some((kernel) => name.includes(`${kernel}<`))) continue;
    const start = parseInt(match[1], 16);
    symbols.push({ name, start, end: start + parseInt(match[2], 16) });
  }
  return symbols;
}

/** Prefetch instructions per symbol, from one disassembly of the span that holds them all. */
function prefetchCounts(addon: string, symbols: KernelSymbol[]): Map<KernelSymbol, number> | null {
  const from = Math.min(...symbols.map((s) => s.start)), to = Math.max(...symbols.map((s) => s.end));
  const text = tool('objdump', ['-d', '--no-show-raw-insn', `--start-address=0x${from.toString(16)}`, `--stop-address=0x${to.toString(16)}`, addon]);
  if (text === null) return null;
  const sorted = [...symbols].sort((a, b) => a.start - b.start);
  const counts = new Map<KernelSymbol, number>(symbols.map((s) => [s, 0]));
  let at = 0;
  for (const line of text.split('\n')) {
    const match = /^\s*([0-9a-f]+):\s+(prefetch\S*)/.exec(line);
    if (!match) continue;
    const address = parseInt(match[1], 16);
    while (at < sorted.length && sorted[at].end <= address) at++;
    if (at < sorted.length && sorted[at].start <= address) counts.set(sorted[at], counts.get(sorted[at])! + 1);
  }
  return counts;
}

const addon = addonPath();
const symbols = process.arch === 'x64' ? kernelSymbols(addon) : null;
const counts = symbols !== null && symbols.length > 0 ? prefetchCounts(addon, symbols) : null;

describe.skipIf(counts === null)('software prefetches survive in the built kernels', () => {
  for (const kernel of KERNELS) {
    const instances = (symbols ?? []).filter((s) => s.name.includes(`${kernel}<`));
    // A compiler that inlines every instance into its dispatcher leaves nothing to look at here.
    it.skipIf(instances.length === 0)(`${kernel}: every compiled instance prefetches (${instances.length} instances)`, () => {
      const without = instances.filter((s) => counts!.get(s) === 0).map((s) => s.name);
      expect(without, `instances of ${kernel} without a prefetch instruction`).toEqual([]);
    });
  }
});
