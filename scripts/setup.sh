#!/usr/bin/env bash
# Creates .venv with mova-rt installed (editable) and its test tools, on a fresh machine.
# torch is pinned to the CPU wheel that this machine kind provides locally (an open range would
# pull the multi-GB CUDA build); triton 3.6.0 needs numpy<2.4 for its CPU interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" "triton==3.6.0" "numpy<2.4"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,bench]"
