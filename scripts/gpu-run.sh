#!/usr/bin/env bash
# On a GPU machine without network, from the repository root, with .gpu (scripts/gpu-pack.sh) and
# dist beside it: unpacks node, the test dependencies and the CUDA addon, then runs the whole test
# suite on the GPU (KVSLIM_TEST_DEVICE=cuda), the CUDA bench rows, the loading policies' decode
# (scripts/gpu-loading.mjs), KIVI's (scripts/gpu-kivi.mjs) and the selection policies' prefill
# (scripts/gpu-policies.mjs) on the GPU, the tensor-core kernels (part tf32: the GPU tests and
# prefill timings again with KVSLIM_CUDA_TF32_MASS=1 and KVSLIM_CUDA_TF32_PREFILL=1:
# native/cuda/lse_mass_tf32.cu, attention_prefill_tf32.cu), the loading and KIVI timings also with
# .gpu/kvslim-base.node.xz when packed (an earlier build, for an A/B in the same session). Logs go
# to $OUT (or ./gpu-run-out). TEST_LIMIT / BENCH_LIMIT / LOADING_LIMIT / KIVI_LIMIT / POLICY_LIMIT:
# seconds for each part (TF32_LIMIT: the tf32 part). PARTS: the parts to run (default "test bench
# loading kivi policies tf32");
# POLICY_TOKENS: the prompt lengths of gpu-policies.mjs (default 32768).
set -uo pipefail
out="${OUT:-gpu-run-out}"
mkdir -p "$out"
export HOME="${HOME:-/tmp}"
mkdir -p /tmp/kvslim-node && xz -dc .gpu/node.xz > /tmp/kvslim-node/node && chmod +x /tmp/kvslim-node/node
export PATH="/tmp/kvslim-node:$PATH"
[ -d node_modules/vitest ] || tar -xJf .gpu/node_modules.tar.xz
[ -e ../shared ] || { [ -d .gpu/shared ] && cp -r .gpu/shared ../shared; }
xz -dc .gpu/kvslim.node.xz > /tmp/kvslim-node/kvslim.node
export KVSLIM_ADDON=/tmp/kvslim-node/kvslim.node
nvidia-smi -L > "$out/nvidia-smi.txt" 2>&1
parts=" ${PARTS:-test bench loading kivi policies tf32} "
part() { [[ "$parts" == *" $1 "* ]]; }
node -e "import('./dist/lib/index.js').then(m => console.log(JSON.stringify(m.backends())))" 2>&1 | tee "$out/backends.txt"
if part test; then
  KVSLIM_TEST_DEVICE=cuda timeout "${TEST_LIMIT:-400}" node node_modules/vitest/vitest.mjs run > "$out/test-gpu.log" 2>&1
  status=$?
  echo "test:gpu: $status ($(sed 's/\x1b\[[0-9;]*m//g' "$out/test-gpu.log" | grep -E 'Tests +[0-9]' | tail -1))"
  sed 's/\x1b\[[0-9;]*m//g' "$out/test-gpu.log" | grep -E "FAIL" | head -20
fi
if part bench; then
  cases=decode-f16-4K-cuda,decode-f16-16K-cuda,decode-f32-64K-cuda,decode-f16-64K-cuda,decode-bf16-64K-cuda,prefill-f16-4K-cuda
  timeout "${BENCH_LIMIT:-150}" node dist/bench/main.js --case "$cases" > "$out/bench.log" 2>&1
  echo "bench: $?"
  grep -E -- "-cuda " "$out/bench.log"
fi
if part loading; then
  timeout "${LOADING_LIMIT:-120}" node scripts/gpu-loading.mjs > "$out/loading.log" 2>&1
  echo "loading: $?"
  cat "$out/loading.log"
fi
if part kivi; then
  timeout "${KIVI_LIMIT:-90}" node scripts/gpu-kivi.mjs 65536 262144 > "$out/kivi.log" 2>&1
  echo "kivi: $?"
  cat "$out/kivi.log"
fi
if part policies; then
  timeout "${POLICY_LIMIT:-90}" node scripts/gpu-policies.mjs ${POLICY_TOKENS:-32768} > "$out/policies.log" 2>&1
  echo "policies: $?"
  cat "$out/policies.log"
fi
if part tf32; then
  # The tensor-core kernels, off by default until this passes: the GPU-vs-CPU and selection tests
  # with both, then the prefill timings with the mass alone and with both (the full row shows the prefill).
  export_tf32="KVSLIM_CUDA_TF32_MASS=1 KVSLIM_CUDA_TF32_PREFILL=1"
  env $export_tf32 KVSLIM_TEST_DEVICE=cuda timeout "${TF32_LIMIT:-200}" node node_modules/vitest/vitest.mjs run \
    test/gpu.test.ts test/attention.test.ts test/prefill-drivers.test.ts test/select.test.ts test/joined-segments.test.ts \
    test/select-long.test.ts > "$out/test-tf32.log" 2>&1
  echo "test:tf32: $? ($(sed 's/\x1b\[[0-9;]*m//g' "$out/test-tf32.log" | grep -E 'Tests +[0-9]' | tail -1))"
  sed 's/\x1b\[[0-9;]*m//g' "$out/test-tf32.log" | grep -E "FAIL|AssertionError" | head -20
  KVSLIM_CUDA_TF32_MASS=1 timeout "${POLICY_LIMIT:-90}" node scripts/gpu-policies.mjs ${POLICY_TOKENS:-32768} > "$out/policies-tf32-mass.log" 2>&1
  echo "policies (tf32 mass): $?"; cat "$out/policies-tf32-mass.log"
  env $export_tf32 timeout "${POLICY_LIMIT:-90}" node scripts/gpu-policies.mjs ${POLICY_TOKENS:-32768} > "$out/policies-tf32.log" 2>&1
  echo "policies (tf32 mass and prefill): $?"; cat "$out/policies-tf32.log"
  env $export_tf32 timeout "${BENCH_LIMIT:-150}" node dist/bench/main.js --case prefill-f16-4K-cuda > "$out/bench-tf32.log" 2>&1
  echo "bench (tf32): $?"; grep -E -- "-cuda " "$out/bench-tf32.log"
fi
# A/B: the loading and KIVI timings with an earlier build packed as .gpu/kvslim-base.node.xz, if any.
if [ -f .gpu/kvslim-base.node.xz ] && { part loading || part kivi; }; then
  xz -dc .gpu/kvslim-base.node.xz > /tmp/kvslim-node/kvslim-base.node
  echo "base build:"
  KVSLIM_ADDON=/tmp/kvslim-node/kvslim-base.node timeout "${LOADING_LIMIT:-120}" node scripts/gpu-loading.mjs 2>&1 | tee "$out/loading-base.log"
  KVSLIM_ADDON=/tmp/kvslim-node/kvslim-base.node timeout "${KIVI_LIMIT:-90}" node scripts/gpu-kivi.mjs 65536 262144 2>&1 | tee "$out/kivi-base.log"
fi
