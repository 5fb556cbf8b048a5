#!/usr/bin/env bash
# Builds the wheel of mova-rt into .whl/ (ignored by git) for the lent GPU machine, which has
# torch, triton, safetensors and transformers but no network: name `.whl` in the device tool's
# `carry` and run benchmarks/device_bench.sh there. Records the commit the wheel was built from,
# since the working-tree copy on that machine has no .git.
#
# That machine runs Python 3.12. Where a Python 3.12 is found here (MOVA_RT_DEVICE_PYTHON, pyenv,
# or PATH) and nvcc + cmake are present, the wheel is built with it and carries the CUDA C++
# extension mova_rt._C for cp312 (CUDA runtime linked statically: only the driver is needed
# there); otherwise it is pure Python and the PyTorch fallbacks run on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl/mova_rt-*.whl
py312=${MOVA_RT_DEVICE_PYTHON:-}
if [ -z "$py312" ]; then
    for c in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 "$(command -v python3.12 || true)"; do
        if [ -n "$c" ] && "$c" --version >/dev/null 2>&1; then py312=$c; break; fi
    done
fi
if [ -n "$py312" ] && command -v nvcc >/dev/null && command -v cmake >/dev/null; then
    venv=build/device-py312
    [ -x "$venv/bin/python" ] || "$py312" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check pybind11 setuptools wheel
    "$venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w .whl .
else
    echo "device_wheel: no Python 3.12 with nvcc and cmake here: building a pure-Python wheel"
    MOVA_RT_BUILD_EXT=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl .
fi
commit=$(git rev-parse HEAD)
git diff --quiet HEAD -- mova_rt kernels benchmarks setup.py csrc CMakeLists.txt || commit="$commit-dirty"
echo "$commit" > .whl/COMMIT
ls -l .whl/mova_rt-*.whl
