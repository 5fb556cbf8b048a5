#!/usr/bin/env bash
# Builds the pure-Python wheel of mova-rt into .whl/ (ignored by git) for the lent GPU machine,
# which has torch, triton, safetensors and transformers but no network: name `.whl` in the device
# tool's `carry` and run benchmarks/device_bench.sh there. Records the commit the wheel was built
# from, since the working-tree copy on that machine has no .git.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl/mova_rt-*.whl
# pure Python: the extension mova_rt._C is built for this machine's Python, not that machine's
MOVA_RT_BUILD_EXT=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl .
commit=$(git rev-parse HEAD)
git diff --quiet HEAD -- mova_rt kernels benchmarks setup.py || commit="$commit-dirty"
echo "$commit" > .whl/COMMIT
ls -l .whl/mova_rt-*.whl
