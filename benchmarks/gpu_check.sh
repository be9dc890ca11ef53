#!/usr/bin/env bash
# One-shot GPU check of come_fast's Triton kernels (scores, gathers, the fused linear + KL
# loss: its tests in fp32/bf16 and its memory/time against the naive loss) + the C++/CUDA extension build,
# for a lent H200 (CUDA torch, triton, nvcc, ninja, pytest-benchmark preinstalled;
# nothing gets installed from outside).  Run from anywhere:
#
#     bash benchmarks/gpu_check.sh                 # ~5-8 min, whole-script budget 480 s
#     bash benchmarks/gpu_check.sh --skip-ext      # kernels only (~3 min)
#     GPU_CHECK_TIMEOUT=300 bash benchmarks/gpu_check.sh --budget-s 260 --no-sweep
#
# Writes benchmarks/RESULTS_gpu.md and benchmarks/gpu_check.log (and copies both to
# $OUT when the device runner provides it).  Every stage is guarded inside
# gpu_check.py; this wrapper adds a hard timeout so the device lease is never
# overrun.  Not yet run: no GPU was lent to the session that wrote it.
set -u
cd "$(dirname "$0")/.." || exit 1
export TRITON_INTERPRET=0
export PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
fi
LIMIT="${GPU_CHECK_TIMEOUT:-560}"
echo "gpu_check.sh: $($PY --version 2>&1), hard limit ${LIMIT}s, args: $*"
timeout --kill-after=15 "$LIMIT" "$PY" benchmarks/gpu_check.py "$@"
rc=$?
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "gpu_check.sh: gpu_check.py hit the ${LIMIT}s hard limit (rc=$rc); partial results kept" \
        | tee -a benchmarks/gpu_check.log
fi
if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
    cp -f benchmarks/RESULTS_gpu.md benchmarks/gpu_check.log "$OUT"/ 2>/dev/null || true
    cp -f benchmarks/bench_kernels_gpu.json "$OUT"/ 2>/dev/null || true
fi
exit "$rc"
