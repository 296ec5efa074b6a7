#!/usr/bin/env bash
# The one command for a lent GPU machine (torch + Triton + pytest there, no vLLM, no network),
# run from the repository root:
#
#   bash benchmarks/ops/gpu.sh            # $OUT/gpu_tests.txt, $OUT/gpu_timing.md when OUT is set
#
# 1. the `gpu` correctness tests (tests/core/test_gpu.py: Triton vs torch ops in bf16 at real
#    head layouts, runtime vs the fp32 oracle), then the kernel tests of test_triton_ops.py, which
#    run compiled on a GPU;
# 2. the timing script (benchmarks/ops/gpu_timing.py) against torch SDPA.
# The exit status is the tests'; timings are written down, not asserted.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-.}
{
    "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/core
    gpu_rc=$?
    "$PY" -m pytest -q -p no:cacheprovider tests/core/test_triton_ops.py
    exit $((gpu_rc || $?))
} 2>&1 | tee "$OUT_DIR/gpu_tests.txt"
rc=${PIPESTATUS[0]}
"$PY" -m benchmarks.ops.gpu_timing "$@"
exit "$rc"
