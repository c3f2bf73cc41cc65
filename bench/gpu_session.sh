#!/usr/bin/env bash
# The GPU checks and measurements of a session that is lent a device, one phase per device call
# (each ends well inside the 10-minute limit of a call); logs and JSON land in $OUT.
#
#   bash bench/gpu_session.sh tests     compiled Triton kernels and the runner on CUDA (test_kernels,
#                                       test_gpu incl. CUDA-graph steps with text_chunk, test_methods)
#   bash bench/gpu_session.sh kernels   kernel benchmarks (wall clock + device time), block-size sweep
#   bash bench/gpu_session.sh train     training-step and packed-step benchmarks, then the step profile
#   bash bench/gpu_session.sh infer     inference and export benchmarks
#
# Full logs go to $OUT/*.log as they are written (a command killed at its time limit still brings
# them back); pytest-benchmark writes its JSON only when a run ends. The exit status is the worst
# of the steps'.
#
# The device image lacks open_clip_torch and ftfy: their wheels travel in .whl/ (ignored through
# .git/info/exclude; see README "GPU runs"), carried with `carry: [".whl"]`.
set -uo pipefail
phase=${1:?usage: bash bench/gpu_session.sh tests|kernels|train|infer}
out=${OUT:-/tmp/fastprompt-gpu}
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || {
    cat "$out/install.log"; exit 1; }
export PYTHONUNBUFFERED=1
stamp="$(date -u +%F)_$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print $2}')"
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$out/versions.txt"

status=0
step() {  # step LOG CMD...: run CMD, its output appended to $out/LOG and shown; remember failures
    local log=$1; shift
    "$@" 2>&1 | tee -a "$out/$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -gt "$status" ] && status=$rc
    return 0
}
bench() {  # bench NAME PYTEST-ARGS...: a benchmark run into $out/${stamp}_NAME.json, then its table
    local name=$1; shift
    step "$name.log" python3 -m pytest -q "$@" --benchmark-only --benchmark-json="$out/${stamp}_$name.json"
    [ -s "$out/${stamp}_$name.json" ] && step "$name.log" python3 -m bench.report "$out/${stamp}_$name.json"
    return 0
}

case "$phase" in
tests)
    step tests.log python3 -m pytest -q --maxfail=20 tests/test_kernels.py tests/test_gpu.py tests/test_methods.py
    ;;
kernels)
    bench kernels bench/test_kernels_bench.py
    export FASTPROMPT_BENCH_TUNE=1
    bench tune bench/test_kernels_bench.py -k tune
    ;;
train)
    bench train bench/test_methods_bench.py -k train_step
    bench pack bench/test_pack_bench.py
    step train.log python3 -m bench.profile_step --method maple
    ;;
infer)
    bench infer bench/test_methods_bench.py bench/test_export_bench.py -k "not train_step"
    ;;
*)
    echo "unknown phase $phase: tests, kernels, train or infer" >&2; exit 2
    ;;
esac
exit "$status"
