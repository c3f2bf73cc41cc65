#!/usr/bin/env bash
# The GPU checks and measurements of a session that is lent a device, one phase per device call
# (each ends well inside the 10-minute limit of a call); logs and JSON land in $OUT.
#
#   bash bench/gpu_session.sh tests     compiled Triton kernels and the runner on CUDA (test_kernels,
#                                       test_gpu incl. CUDA-graph steps with text_chunk, test_methods)
#   bash bench/gpu_session.sh kernels   kernel benchmarks (wall clock + device time), block-size sweep
#   bash bench/gpu_session.sh methods   training-step / inference / export benchmarks, step profile
#
# The device image lacks open_clip_torch and ftfy: their wheels travel in .whl/ (ignored through
# .git/info/exclude; see README "GPU runs"), carried with `carry: [".whl"]`.
set -uo pipefail
phase=${1:?usage: bash bench/gpu_session.sh tests|kernels|methods}
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

case "$phase" in
tests)
    python3 -m pytest -q -x tests/test_kernels.py tests/test_gpu.py tests/test_methods.py \
        2>&1 | tee "$out/tests.log"
    ;;
kernels)
    python3 -m pytest -q bench/test_kernels_bench.py --benchmark-only \
        --benchmark-json="$out/${stamp}_kernels.json" 2>&1 | tail -n 40 | tee "$out/kernels.log"
    FASTPROMPT_BENCH_TUNE=1 python3 -m pytest -q bench/test_kernels_bench.py -k tune --benchmark-only \
        --benchmark-json="$out/${stamp}_tune.json" 2>&1 | tail -n 5 | tee -a "$out/kernels.log"
    for f in "$out/${stamp}_kernels.json" "$out/${stamp}_tune.json"; do
        python3 -m bench.report "$f" | tee -a "$out/kernels.log"
    done
    ;;
methods)
    python3 -m pytest -q bench/test_methods_bench.py bench/test_export_bench.py --benchmark-only \
        --benchmark-json="$out/${stamp}_methods.json" 2>&1 | tail -n 5 | tee "$out/methods.log"
    python3 -m bench.report "$out/${stamp}_methods.json" | tee -a "$out/methods.log"
    python3 -m bench.profile_step --method maple 2>&1 | tail -n 40 | tee -a "$out/methods.log"
    ;;
*)
    echo "unknown phase $phase: tests, kernels or methods" >&2; exit 2
    ;;
esac
