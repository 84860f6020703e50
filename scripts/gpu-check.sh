#!/usr/bin/env bash
# One prepared run for a machine with an NVIDIA GPU (device time is scarce: everything in one go).
# Builds the addon with CUDA required, runs the GPU reference tests (CUDA vs float64 reference and
# vs the CPU path), then the bench (its *-cuda rows appear when a GPU answers), and copies logs and
# the bench JSON to $OUT (or ./gpu-check-out).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check-out}"
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
{
  KVSLIM_CUDA=on npm ci 2>&1 | tail -20
  node -e "import('./dist/lib/index.js').then(m => console.log(JSON.stringify(m.backends(), null, 1)))"
} > "$out/build.log" 2>&1
echo "build: $?"
npm run test:gpu > "$out/test-gpu.log" 2>&1
echo "test:gpu: $? ($(grep -E 'Tests +[0-9]' "$out/test-gpu.log" | tail -1))"
npm run bench > "$out/bench.log" 2>&1
echo "bench: $?"
cp "$(ls -t bench/results/*.json | head -1)" "$out/bench.json" 2>/dev/null || true
tail -30 "$out/bench.log"
