// Writes the headline table of bench/results/latest.json into README.md between the
// <!-- bench-table --> markers, so the README shows measured numbers, never typed ones.
// Usage: npm run bench:readme [-- <results.json>]
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

interface ResultCase {
  id: string; kind: string; device: string; store?: string; tokens: number; status: string;
  time?: { medianMs: number; spreadLowMs: number; spreadHighMs: number };
  gbPerSecond?: number; bandwidthFraction?: number | null; gflopsPerSecond?: number; peakFraction?: number | null;
  speedup?: number;
}

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const resultsPath = resolve(process.argv[2] ?? join(root, 'bench', 'results', 'latest.json'));
const results = JSON.parse(readFileSync(resultsPath, 'utf8')) as {
  createdAt: string; machine: { cpuModel: string; cores: number; node: string };
  kvslim: { backends: { cpu: { simd: string; threads: number } } };
  limits: { readBytesPerSecond: number; fmaFlopsPerSecond: number; after?: { readBytesPerSecond: number; fmaFlopsPerSecond: number } };
  cases: ResultCase[];
};

const number = (value: unknown, digits: number): string => (typeof value === 'number' ? value.toFixed(digits) : 'n/a');
const lines: string[] = [];
const limits = results.limits;
lines.push(
  `Measured ${results.createdAt} on ${results.machine.cpuModel} (${results.machine.cores} cores, ` +
    `${results.kvslim.backends.cpu.simd}, ${results.kvslim.backends.cpu.threads} threads), Node ${results.machine.node}; ` +
    `read bandwidth ${number(limits.readBytesPerSecond / 1e9, 1)} GB/s and f32 FMA peak ${number(limits.fmaFlopsPerSecond / 1e9, 0)} GFLOP/s ` +
    `probed in the same run${limits.after ? ` (after the cases: ${number(limits.after.readBytesPerSecond / 1e9, 1)} GB/s, ${number(limits.after.fmaFlopsPerSecond / 1e9, 0)} GFLOP/s)` : ''}.`,
  '',
  '| case | ms (median) | spread ms (p10–p90) | rate | of the probed limit | vs plain JS |',
  '| --- | ---: | ---: | ---: | ---: | ---: |',
);
for (const c of results.cases) {
  if (c.id.startsWith('js-') || c.status !== 'ok' || !c.time) continue;
  const rate = c.kind === 'decode' ? `${number(c.gbPerSecond, 1)} GB/s` : `${number(c.gflopsPerSecond, 0)} GFLOP/s`;
  const fraction = c.kind === 'decode' ? number(c.bandwidthFraction, 2) : number(c.peakFraction, 2);
  lines.push(
    `| ${c.id} | ${number(c.time.medianMs, 2)} | ${number(c.time.spreadLowMs, 2)}–${number(c.time.spreadHighMs, 2)} | ${rate} | ${fraction} | ${number(c.speedup, 0)}× |`,
  );
}
lines.push('', `Reproduce with \`npm run bench\` (JSON in \`bench/results/\`); one row with \`npm run bench -- --case <case>\`.`);

const readmePath = join(root, 'README.md');
const readme = readFileSync(readmePath, 'utf8');
const start = '<!-- bench-table -->';
const end = '<!-- /bench-table -->';
const before = readme.slice(0, readme.indexOf(start));
const afterIndex = readme.indexOf(end);
const after = afterIndex >= 0 ? readme.slice(afterIndex + end.length) : '\n';
if (readme.indexOf(start) < 0) throw new Error(`README.md has no ${start} marker`);
writeFileSync(readmePath, `${before}${start}\n${lines.join('\n')}\n${end}${after}`);
console.log(`README.md: wrote ${lines.length} lines from ${resultsPath}`);
