// scripts/dump_kv.py, the Hugging Face q/k/v dump script: its writer (numpy only) must produce
// traces that kvslim's readTrace accepts bit for bit, and its CLI must parse arguments without
// torch or transformers. The capture itself (torch + transformers) is exercised on a GPU host.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { readTrace, traceSource } from '../../lib/index.js';
import { mulberry32 } from '../helpers/random.js';

const repositoryRoot = resolve(__dirname, '../..');
const script = join(repositoryRoot, 'scripts/dump_kv.py');
const writerFixture = join(repositoryRoot, 'test/fixtures/dump_kv_writer.py');

const python = (args: string[], env: NodeJS.ProcessEnv = process.env) =>
  spawnSync('python3', args, { encoding: 'utf8', env, timeout: 60_000 });
const hasPython = python(['--version']).status === 0;
const hasNumpy = hasPython && python(['-c', 'import numpy']).status === 0;
const numpySkip = hasNumpy ? '' : ` (skipped: ${hasPython ? 'python3 -c "import numpy" failed' : 'python3 not found'})`;
const pythonSkip = hasPython ? '' : ' (skipped: python3 not found)';
if (!hasNumpy) console.warn(`dump_kv.py writer tests skipped: ${hasPython ? 'numpy is not installed for python3' : 'python3 not found'}`);

const dir = mkdtempSync(join(tmpdir(), 'kvslim-dump-kv-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

// Stand-ins that fail on import: the CLI must get through --help and argument errors without them.
const stubs = join(dir, 'stubs');
mkdirSync(stubs);
for (const name of ['torch', 'transformers']) writeFileSync(join(stubs, `${name}.py`), `raise ImportError('${name} is blocked by dump_kv.test.ts')\n`);
const withoutTorch = { ...process.env, PYTHONPATH: stubs };

describe.skipIf(!hasNumpy)(`dump_kv.py writer → readTrace${numpySkip}`, () => {
  it('writes a trace readTrace reads back bit-exactly, with the metadata unchanged', () => {
    const config = {
      layers: 2, qHeads: 4, kvHeads: 2, headDim: 8, modelLayers: 32, ropeTheta: 500000, rope: { theta: 500000, style: 'half' },
      ropeScaling: null, architecture: 'llama', keys: 'post-rope', model: 'test/model', dtype: 'float32',
    };
    const rows = 7;
    const tokens = [1, 15043, 29892, 3186, 29991, 2 ** 40, 0];
    const meta = { config, tokens, promptTokens: 4, prompt: 'Hello, wörld', turns: [{ text: ' — next?', start: 4, end: 7 }] };

    // Random bit patterns: every float32 class (NaN payloads, infinities, subnormals, -0) must survive.
    const uniform = mulberry32(7);
    const bits = (length: number) => Uint32Array.from({ length }, () => Math.floor(uniform() * 2 ** 32));
    const qLength = rows * config.qHeads * config.headDim, kvLength = rows * config.kvHeads * config.headDim;
    const expected = [0, 1].map((layer) => ({
      q: bits(qLength), k: bits(kvLength), v: bits(kvLength), ...(layer === 0 && { out: bits(qLength) }),
    }));
    expected[0].q.set([0x7fc00001, 0xffa00000, 0x7f800000, 0xff800000, 0x00000001, 0x80000000, 0x7f7fffff], 0);

    const input = join(dir, 'input');
    mkdirSync(input);
    writeFileSync(join(input, 'meta.json'), JSON.stringify(meta));
    expected.forEach((layer, i) => {
      for (const [part, data] of Object.entries(layer)) writeFileSync(join(input, `${i}.${part}.bin`), new Uint8Array(data.buffer));
    });
    const output = join(dir, 'trace.safetensors');
    const run = python([writerFixture, input, output], withoutTorch);
    expect(run.stderr).toBe('');
    expect(run.status).toBe(0);
    const report = JSON.parse(run.stdout) as { sameBytes: boolean; errors: Record<string, string | null> };
    expect(report.sameBytes).toBe(true); // encode_trace's bytes are what write_trace wrote

    const trace = readTrace(output);
    expect(trace.meta).toEqual(meta);
    expect(trace.layers).toHaveLength(2);
    trace.layers.forEach((layer, i) => {
      expect(Object.keys(layer).sort()).toEqual(Object.keys(expected[i]).sort());
      for (const [part, data] of Object.entries(expected[i])) {
        const actual = layer[part as 'q' | 'k' | 'v' | 'out'] as Float32Array;
        expect(Buffer.from(new Uint32Array(actual.buffer, actual.byteOffset, actual.length).buffer).equals(Buffer.from(data.buffer)), `layers.${i}.${part}`).toBe(true);
      }
    });
    // promptTokens splits context from queries the way kvslim eval replays traces.
    expect(traceSource(trace).contextTokens).toBe(4);

    // Malformed input is a ValueError naming the problem, before anything is written.
    expect(report.errors).toEqual({
      shape: expect.stringContaining('layers.0.q has shape [6, 4, 8], expected [7, 4, 8]'),
      missingV: expect.stringContaining('layer 1 has no v'),
      layers: expect.stringContaining('expected 2 layers'),
      kvHeads: expect.stringContaining('multiple of config["kvHeads"]'),
      tokens: expect.stringContaining('non-negative integer token ids'),
      format: expect.stringContaining('reserved'),
      nan: expect.stringContaining('JSON'),
      intData: expect.stringContaining('expected a float type'),
    });
  });
});

describe.skipIf(!hasPython)(`dump_kv.py CLI without torch${pythonSkip}`, () => {
  it('--help exits 0 and lists the options', () => {
    const run = python([script, '--help'], withoutTorch);
    expect(run.status).toBe(0);
    for (const option of ['--model', '--prompt', '--turn', '--out', '--dtype', '--device', '--max-layers']) expect(run.stdout).toContain(option);
  });

  it.each([
    [['--model', 'm', '--prompt', 'p', '--out', 'x.safetensors', '--dtype', 'float8'], /--dtype: invalid choice: 'float8'/],
    [['--model', 'm', '--prompt', 'p', '--out', 'x.safetensors', '--max-layers', '0'], /--max-layers: expected a positive integer, got '0'/],
    [['--model', 'm', '--out', 'x.safetensors'], /the following arguments are required: --prompt/],
    [['--model', 'm', '--prompt', 'p', '--out', 'x.safetensors', '--bogus'], /unrecognized arguments: --bogus/],
  ])('rejects %j with a message', (args, message) => {
    const run = python([script, ...args], withoutTorch);
    expect(run.status).toBe(2);
    expect(run.stderr).toMatch(message);
    expect(run.stdout).toBe('');
  });

  it('says what to install when torch and transformers are missing, and writes nothing', () => {
    const output = join(dir, 'never.safetensors');
    const run = python([script, '--model', 'm', '--prompt', 'p', '--out', output], withoutTorch);
    expect(run.status).toBe(1);
    expect(run.stderr).toMatch(/dump_kv\.py: error: .*needs (torch and transformers|numpy)/);
    expect(existsSync(output)).toBe(false);
  });
});
