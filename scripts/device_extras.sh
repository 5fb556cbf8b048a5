#!/usr/bin/env bash
# Downloads the optional packages the lent GPU machine lacks (it has no network) into .whl/
# (ignored by git), next to the mova-rt wheel of scripts/device_wheel.sh. Today one package:
# nvidia-cudnn-frontend, cuDNN's Python graph API, for the `cudnn-fp8` attention backend
# (mova_rt/attention_cudnn.py).
#
# On the GPU machine (name `.whl` in the device tool's carry), install everything in .whl/:
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
# then run with PYTHONPATH=/tmp/site. benchmarks/device_bench.sh installs only
# .whl/mova_rt-*.whl at the time of writing: run the line above first (its --upgrade install of
# the mova-rt wheel then replaces only mova_rt), or widen its glob to .whl/*.whl.
#
# The version is pinned to the one the backend was written and validated against: 1.23.0, a
# 3.1 MB cp312 wheel with no hard dependencies (its Requires-Dist are all under the `cutedsl`
# extra, which the graph API does not use), and the release whose source (github
# NVIDIA/cudnn-frontend, python/pygraph/sdpa.cpp, test/python/sdpa/fp8.py) was read. The newest
# on PyPI when written, 1.32.0, is an 11.6 MB wheel that declares nvidia-cutlass-dsl[cu13] and
# apache-tvm-ffi as hard dependencies; the CUTLASS DSL's libraries (~92 MB) cannot travel with a
# command (64 MiB), and installing it with --no-deps would run it outside its declared needs.
#
# cu12 or cu13: nvidia-cudnn-frontend has one wheel per Python, not one per CUDA: its compiled
# module links no CUDA library (ELF NEEDED: libstdc++, libm, libgcc_s, libc) and dlopens at run
# time libcudnn.so.9 (first under site-packages nvidia/cudnn/lib, else by soname, which finds the
# copy torch has loaded), libcudart.so.12 or .13 (whichever resolves; it refuses if both do) and
# libcuda.so.1. torch 2.11.0+cu130 brings nvidia-cudnn-cu13 9.19.0.56 (its wheel's Requires-Dist)
# and the CUDA 13 runtime, so the same wheel uses cuDNN 9.19 and libcudart.so.13 there; the graph
# was validated for sm_90 against exactly that cuDNN, without a device. The only cu12/cu13 choice
# in the package is its `cutedsl` extra (nvidia-cutlass-dsl[cu13] in 1.23.0), not needed here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VERSION=1.23.0
MAX_BYTES=$((12 * 1024 * 1024))      # leaves the rest of the 64 MiB carry to the mova-rt wheel
mkdir -p .whl
rm -f .whl/nvidia_cudnn_frontend-*.whl
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    -d .whl "nvidia-cudnn-frontend==$VERSION"
whl=$(ls .whl/nvidia_cudnn_frontend-"$VERSION"-cp312-cp312-*.whl)
size=$(stat -c %s "$whl")
if [ "$size" -gt "$MAX_BYTES" ]; then
    echo "device_extras: $whl is $size bytes, over $MAX_BYTES" >&2
    exit 1
fi
ls -l "$whl"
