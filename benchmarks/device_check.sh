#!/usr/bin/env bash
# The first thing to run whenever a GPU is lent: every GPU check of mova-rt in one command, each
# part in its own process under its own time limit, inside one overall budget (9 minutes), every
# result under OUTDIR and a summary table against the targets at the end.
#
#   bash benchmarks/device_check.sh OUTDIR                          # on an H100 / H200
#   bash benchmarks/device_check.sh OUTDIR --preset tiny --device cpu   # the CPU smoke (CI)
#
# On the GPU machine it installs the wheel carried in .whl/ (scripts/device_wheel.sh) into
# /tmp/site and runs from /tmp, as benchmarks/device_bench.sh does; elsewhere it runs the
# installed mova_rt with $PYTHON (default python3).
#
# Parts, in order of value (a part cut off by its limit or the budget reports itself and the
# next still runs; what does not fit in the budget left is reported as skipped; --parts names a
# subset, e.g. the ones an earlier run skipped):
#   steps      mova-rt bench: reference, auto, fp8, each in its own process, its own limit, with
#              the per-forward error of each against reference on the same weights (per tower)
#   ops        mova-rt bench --ops at the preset's shapes (every backend of every op, our Triton
#              and fp8 attention kernels against cuDNN included)
#   gpu_tests  tests/test_kernels_gpu.py at full size: each kernel against an fp32 truth, and the
#              profiler's kernel names of what auto runs (a silent fallback fails)
#   offload    mova-rt bench: offload-group under --vram-budget 24
#   compile    mova-rt bench: generate --compile's configuration (its own limit: it compiles)
#   attn8      mova-rt bench: fp8-attn8 (fp8 GEMMs and 8-bit attention) with its forward error
#   tables     the auto kernel table and the fp8 dispatch table rebuilt from this run's ops
# then `python -m mova_rt.benchmarks.device_summary OUTDIR` writes summary.json / summary.md.
#
# OUTDIR ends up with at most 8 files (what the device tool brings back): log.txt, ops.json,
# steps.json, compile.json, offload.json, attn8.json, summary.json, summary.md.
set -uo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/device_check.sh OUTDIR [--preset P --device D]" >&2
    exit 2
fi
out=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "error: cannot create $1" >&2; exit 2; }
shift
preset=mova-360p
device=""
all_parts=steps,ops,gpu_tests,offload,compile,attn8,tables
parts=$all_parts
while [ $# -gt 0 ]; do
    case "$1" in
        --preset) preset=$2; shift 2 ;;
        --device) device=$2; shift 2 ;;
        --parts) parts=$2; shift 2 ;;
        *) echo "error: unknown argument $1 (use --preset P, --device D, --parts $all_parts)" >&2
           exit 2 ;;
    esac
done
for p in ${parts//,/ }; do
    case ",$all_parts," in *",$p,"*) ;; *) echo "error: unknown part $p (parts: $all_parts)" >&2
                                            exit 2 ;; esac
done
wanted() { case ",$parts," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
root=$(cd "$(dirname "$0")/.." && pwd)
budget=${MOVA_CHECK_BUDGET:-540}
start=$(date +%s)
work=$(mktemp -d /tmp/mova-check-XXXXXX)
trap 'rm -rf "$work"' EXIT
log="$out/log.txt"
: > "$log"

if ls "$root"/.whl/mova_rt-*.whl >/dev/null 2>&1; then      # the lent GPU machine
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$root"/.whl/*.whl >>"$log" 2>&1      # + scripts/device_extras.sh
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    MOVA_RT_COMMIT=$(cat "$root/.whl/COMMIT")
    export MOVA_RT_COMMIT
    PY=python3
else
    PY=${PYTHON:-python3}
    case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
fi
export PYTHONUNBUFFERED=1
# on a CPU (the smoke run) mova-rt's Triton kernels run through Triton's interpreter
[ "$device" = cpu ] && export TRITON_INTERPRET=1
cd /tmp                      # the source tree's mova_rt/ must not shadow the installed package
dev=()
[ -n "$device" ] && dev=(--device "$device")
smoke=0
[ "$preset" = tiny ] && smoke=1

left() { echo $(( budget - ($(date +%s) - start) )); }

# part NAME LIMIT CMD...: runs CMD under min(LIMIT, the budget left), appends its output to the
# log and one line to the parts file: name, status (ok / failed / timeout / skipped), seconds.
part() {
    local name=$1 limit=$2
    shift 2
    local t0 rc status room
    room=$(left)
    [ "$room" -lt "$limit" ] && limit=$room
    if [ "$limit" -lt 20 ]; then
        echo "{\"part\": \"$name\", \"status\": \"skipped\", \"seconds\": 0, \"limit\": $limit}" \
            >> "$work/parts.jsonl"
        echo "=== $name: skipped (${limit}s of the budget left)" >> "$log"
        return
    fi
    echo "=== $name (limit ${limit}s): $*" >> "$log"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    echo "{\"part\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 )), \"limit\": $limit}" \
        >> "$work/parts.jsonl"
    echo "=== $name: $status (rc $rc, $(( $(date +%s) - t0 ))s)" >> "$log"
}

{
    echo "device_check: preset $preset, device ${device:-default}, budget ${budget}s"
    date -u
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
        --format=csv,noheader
    $PY -c "import torch, mova_rt; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'mova_rt', mova_rt.__version__, 'commit', __import__('os').environ.get('MOVA_RT_COMMIT'))"
} >> "$log" 2>&1

bench=("$PY" -m mova_rt bench --preset "$preset" "${dev[@]}" --no-progress)
if [ $smoke = 1 ]; then per=60; steps=(--warmup 1 --steps 1); budget_flag=()
else per=75; steps=(--warmup 1 --steps 2); budget_flag=(--vram-budget 24); fi

wanted steps && part steps $(( 3 * per + 30 )) "${bench[@]}" --configs reference,auto,fp8 \
    "${steps[@]}" --config-timeout "$per" --forward-error --json "$out/steps.json" \
    --chart "$work/steps.png"
wanted ops && part ops 120 "${bench[@]}" --ops --steps 0 --op-seconds 0.2 --json "$out/ops.json" \
    --chart "$work/ops.png"
wanted gpu_tests && part gpu_tests 90 env TRITON_INTERPRET=0 "$PY" -m pytest -q \
    -p no:cacheprovider "$root/tests/test_kernels_gpu.py" --junitxml "$work/gpu_tests.xml"
wanted offload && part offload $(( per + 30 )) "${bench[@]}" --configs offload-group \
    "${budget_flag[@]}" "${steps[@]}" --config-timeout "$(( per + 10 ))" \
    --json "$out/offload.json" --chart "$work/offload.png"
wanted compile && part compile $(( 2 * per + 30 )) "${bench[@]}" --configs compile "${steps[@]}" \
    --config-timeout $(( 2 * per )) --json "$out/compile.json" --chart "$work/compile.png"
# reference again first: the forward error of the 8-bit path against it, same seed, same weights
wanted attn8 && part attn8 $(( 3 * per + 30 )) "${bench[@]}" --configs reference,fp8-attn8,fp8-cudnnattn \
    "${steps[@]}" --config-timeout "$per" --forward-error --json "$out/attn8.json" \
    --chart "$work/attn8.png"
if [ $smoke = 0 ] && wanted tables; then   # the tables are built from GPU measurements only
    part kernel_table 30 "$PY" -m mova_rt.autoselect "$out/ops.json" --out "$work/kernel_table.json"
    part fp8_table 30 "$PY" -m mova_rt.fp8.dispatch "$out/ops.json" --out "$work/fp8_dispatch.json"
fi

"$PY" -m mova_rt.benchmarks.device_summary "$out" --work "$work" --preset "$preset" 2>&1 \
    | tee -a "$log"
