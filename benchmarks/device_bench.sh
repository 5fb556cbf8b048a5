#!/usr/bin/env bash
# On the lent GPU machine: installs the carried wheel (scripts/device_wheel.sh) into /tmp/site and
# runs `mova-rt bench` with the given arguments, from /tmp so the source tree's mova_rt/ (which
# lacks the mova_rt.benchmarks mapping) does not shadow the installed package.
#   bash benchmarks/device_bench.sh --preset mova-360p --configs reference --json "$OUT/r.json"
#   bash benchmarks/device_bench.sh build --preset mova-360p --out /tmp/engine-360p
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$root"/.whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
MOVA_RT_COMMIT=$(cat "$root/.whl/COMMIT")
export MOVA_RT_COMMIT
cd /tmp
# a first argument build/generate/info runs that command instead of bench (e.g. an engine first)
case "${1:-}" in
    build|generate|info) exec python3 -m mova_rt "$@" ;;
esac
exec python3 -m mova_rt bench "$@"
