#!/usr/bin/env bash
# Packs what a GPU machine with no network needs into .gpu/ (git-ignored, about 40 MB): this
# machine's node binary, the test dependencies, a CUDA build of the addon and ../shared.
# Build here (nvcc needed, no GPU needed), then on the GPU machine, from the repository root with
# .gpu and dist carried along: `bash scripts/gpu-run.sh` (the whole CUDA suite, a bench sweep).
# KVSLIM_CUDA_ARCHS picks the architectures (default 90: an H100 / H200).
set -euo pipefail
cd "$(dirname "$0")/.."
archs="${KVSLIM_CUDA_ARCHS:-90}"
mkdir -p .gpu
npx tsc -p tsconfig.json
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# A copy of the tracked sources, so the CUDA build does not replace ./build.
git ls-files -z | xargs -0 cp --parents -t "$work"
ln -s "$PWD/node_modules" "$work/node_modules"
(cd "$work" && KVSLIM_CUDA=on KVSLIM_CUDA_ARCHS="$archs" node scripts/build-native.mjs --force)
xz -T0 -6 -c "$work/build/Release/kvslim.node" > .gpu/kvslim.node.xz
xz -T0 -6 -c "$(command -v node)" > .gpu/node.xz
tar -cf - node_modules | xz -T0 -6 > .gpu/node_modules.tar.xz
chmod -R u+w .gpu/shared 2>/dev/null || true
rm -rf .gpu/shared
if [ -d ../shared ]; then cp -r ../shared .gpu/shared && chmod -R u+w .gpu/shared; fi
du -sh .gpu
