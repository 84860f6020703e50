#!/usr/bin/env node
// Builds the kvslim addon: the CPU backend always, the CUDA backend when nvcc is found.
//   KVSLIM_CUDA=auto (default) build CUDA when nvcc exists; on: require it; off: never.
//   CUDA_HOME / CUDA_PATH      where the toolkit lives (else nvcc on PATH, else /usr/local/cuda)
//   KVSLIM_CUDA_ARCHS          e.g. "80;86;89;90" (the default)
// Without --force, an existing prebuild for this platform is used and nothing is compiled.
// --prebuild packs the result into prebuilds/<platform>-<arch>/ with prebuildify (CUDA included).
import { spawn, spawnSync } from 'node:child_process';
import { availableParallelism } from 'node:os';
import { existsSync, mkdirSync, readdirSync, realpathSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const prebuild = process.argv.includes('--prebuild');
const force = prebuild || process.argv.includes('--force');
const mode = (process.env.KVSLIM_CUDA ?? 'auto').toLowerCase();
const archs = (process.env.KVSLIM_CUDA_ARCHS ?? '80;86;89;90').split(/[;,\s]+/).filter(Boolean);

function log(message) {
  process.stderr.write(`kvslim: ${message}\n`);
}

function fail(message) {
  log(message);
  process.exit(1);
}

if (!['auto', 'on', 'off'].includes(mode)) fail(`KVSLIM_CUDA must be auto, on or off, but is '${mode}'`);
for (const arch of archs) if (!/^\d{2,3}[a-z]?$/.test(arch)) fail(`KVSLIM_CUDA_ARCHS entry '${arch}' is not like 80 or 90a`);

const prebuildDir = join(root, 'prebuilds', `${process.platform}-${process.arch}`);
if (!force && existsSync(prebuildDir) && readdirSync(prebuildDir).some((f) => f.endsWith('.node'))) {
  log(`using the prebuild in ${prebuildDir}`);
  process.exit(0);
}

function findNvcc() {
  const homes = [process.env.CUDA_HOME, process.env.CUDA_PATH].filter(Boolean);
  for (const home of homes) {
    const candidate = join(home, 'bin', 'nvcc');
    if (existsSync(candidate)) return candidate;
  }
  const which = spawnSync('sh', ['-c', 'command -v nvcc'], { encoding: 'utf8' });
  if (which.status === 0 && which.stdout.trim()) return which.stdout.trim();
  if (existsSync('/usr/local/cuda/bin/nvcc')) return '/usr/local/cuda/bin/nvcc';
  return null;
}

// The toolkit root. nvcc on PATH may be a wrapper script, so ask nvcc itself (its TOP variable).
function cudaHomeOf(nvcc) {
  const fromEnv = process.env.CUDA_HOME ?? process.env.CUDA_PATH;
  if (fromEnv) return fromEnv;
  const dryrun = spawnSync(nvcc, ['--dryrun', '-x', 'cu', '-c', '/dev/null', '-o', '/dev/null'], { encoding: 'utf8' });
  const match = /TOP=(\S+)/.exec(`${dryrun.stderr ?? ''}${dryrun.stdout ?? ''}`);
  return resolve(match ? match[1] : join(dirname(realpathSync(nvcc)), '..'));
}

// node-gyp: the one npm runs install scripts with, else our dev dependency.
function nodeGypScript() {
  const fromNpm = process.env.npm_config_node_gyp;
  if (fromNpm && existsSync(fromNpm)) return fromNpm;
  try {
    const require = createRequire(import.meta.url);
    return join(dirname(require.resolve('node-gyp/package.json')), 'bin', 'node-gyp.js');
  } catch {
    return null;
  }
}

function findStaticRuntime(home) {
  for (const sub of ['lib64', 'lib', 'targets/x86_64-linux/lib', 'targets/sbsa-linux/lib']) {
    if (existsSync(join(home, sub, 'libcudart_static.a'))) return join(home, sub);
  }
  return null;
}

function run(command, args, options = {}) {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(command, args, { stdio: 'inherit', cwd: root, ...options });
    child.on('error', reject);
    child.on('exit', (code) => (code === 0 ? resolvePromise() : reject(new Error(`${command} exited with ${code}`))));
  });
}

async function buildCuda(nvcc, home) {
  // Outside build/: node-gyp rebuild deletes build/ before it links.
  const outDir = join(root, 'build-cuda');
  rmSync(outDir, { recursive: true, force: true });
  mkdirSync(outDir, { recursive: true });
  const sources = readdirSync(join(root, 'native', 'cuda')).filter((f) => f.endsWith('.cu')).sort();
  const gencode = archs.flatMap((arch) => ['-gencode', `arch=compute_${arch},code=sm_${arch}`]);
  const newest = archs[archs.length - 1];
  gencode.push('-gencode', `arch=compute_${newest},code=compute_${newest}`); // PTX for newer GPUs
  const objects = [];
  const started = Date.now();
  // Two files at a time: enough for 2-core CI, and nvcc --threads splits architectures.
  const queue = [...sources];
  const workers = Array.from({ length: 2 }, async () => {
    for (let source = queue.shift(); source; source = queue.shift()) {
      const object = join(outDir, source.replace(/\.cu$/, '.o'));
      objects.push(object);
      log(`nvcc ${source} (sm_${archs.join(', sm_')})`);
      await run(nvcc, [
        '-O3', '-std=c++17', '--threads', '2', '-Xcompiler', '-fPIC', '-Xcompiler', '-Wall',
        '--expt-relaxed-constexpr', '-DKVSLIM_CUDA_ARCHS="' + archs.join(',') + '"',
        '-I', join(root, 'native'), ...gencode, '-c', join('native', 'cuda', source), '-o', object,
      ]);
    }
  });
  await Promise.all(workers);
  const library = join(outDir, 'libkvslim_cuda.a');
  await run('ar', ['rcs', library, ...objects.sort()]);
  log(`CUDA backend compiled in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  return library;
}

async function main() {
  let cuda = null;
  if (mode !== 'off') {
    const nvcc = findNvcc();
    if (!nvcc) {
      if (mode === 'on') fail('KVSLIM_CUDA=on but nvcc was not found (set CUDA_HOME or put nvcc on PATH)');
      log('nvcc not found: building the CPU backend only (KVSLIM_CUDA=auto)');
    } else {
      const home = cudaHomeOf(nvcc);
      const libDir = findStaticRuntime(home);
      if (!libDir) {
        if (mode === 'on') fail(`found nvcc at ${nvcc} but no libcudart_static.a under ${home}`);
        log(`nvcc found but no libcudart_static.a under ${home}: building the CPU backend only`);
      } else {
        try {
          cuda = { library: await buildCuda(nvcc, home), libDir };
        } catch (error) {
          if (mode === 'on') fail(`CUDA build failed: ${error.message}`);
          log(`CUDA build failed (${error.message}): building the CPU backend only; set KVSLIM_CUDA=on to make this fatal`);
        }
      }
    }
  }
  if (prebuild) {
    // prebuildify runs its own node-gyp; node-gyp turns npm_config_* variables into gyp variables.
    const env = { ...process.env };
    if (cuda) Object.assign(env, { npm_config_kvslim_cuda: '1', npm_config_cuda_lib: cuda.library, npm_config_cuda_lib_dir: cuda.libDir });
    const require = createRequire(import.meta.url);
    const prebuildify = join(dirname(require.resolve('prebuildify/package.json')), 'bin.js');
    await run(process.execPath, [prebuildify, '--napi', '--strip'], { env });
    log(`packed prebuilds/${process.platform}-${process.arch}/ (${cuda ? 'CPU + CUDA' : 'CPU only'})`);
    return;
  }
  const nodeGyp = nodeGypScript();
  if (!nodeGyp) fail('node-gyp was not found: run this from npm (npm install / npm rebuild) or install node-gyp');
  const gypArgs = [nodeGyp, 'rebuild', `--jobs=${availableParallelism()}`];
  // Node's own headers when they ship beside the binary: no header download, works offline.
  const prefix = resolve(dirname(process.execPath), '..');
  if (!process.env.npm_config_nodedir && existsSync(join(prefix, 'include', 'node', 'node_api.h'))) {
    gypArgs.push(`--nodedir=${prefix}`);
  }
  if (cuda) gypArgs.push('--kvslim_cuda=1', `--cuda_lib=${cuda.library}`, `--cuda_lib_dir=${cuda.libDir}`);
  await run(process.execPath, gypArgs);
  log(`built build/Release/kvslim.node (${cuda ? 'CPU + CUDA' : 'CPU only'})`);
}

main().catch((error) => fail(error.message));
