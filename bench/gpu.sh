#!/usr/bin/env bash
# jemfast on a CUDA GPU: the GPU tests, then the full benchmark suite, then a summary table.
# Installs nothing: run it inside the environment where jemfast (pip install -e '.[dev]') lives.
#
#   bash bench/gpu.sh [OUT_DIR]          # default OUT_DIR: .benchmarks/gpu-<date> (git-ignored)
#   PYTHON=/path/to/python bash bench/gpu.sh
#   JEMFAST_PEAK_TFLOPS=989 bash bench/gpu.sh   # dense bf16 peak if the GPU is not H100/H200/A100
#
# Writes OUT_DIR/gpu-tests.log, bench.log, bench.json (pytest-benchmark) and summary.md.
# Exit status: non-zero if the GPU tests or the benchmarks failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${1:-.benchmarks/gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh: no CUDA device visible to $PY (torch.cuda.is_available() is False)" >&2
    exit 2
fi
"$PY" - <<'PYEOF' | tee "$OUT/env.txt"
import platform, torch
import jemfast
from jemfast.sgld import resolve_backend
print(f"jemfast {jemfast.__version__}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"python {platform.python_version()}")
print(f"GPU: {torch.cuda.get_device_name(0)}; auto backend: {resolve_backend('auto', 'cuda')}")
PYEOF

echo "== 1/3 GPU tests: pytest tests -m gpu" | tee "$OUT/gpu-tests.log"
"$PY" -m pytest tests -m gpu -q -rs -s 2>&1 | tee -a "$OUT/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== 2/3 benchmarks: pytest bench/ --bench-full" | tee "$OUT/bench.log"
JEMFAST_BENCH_FULL=1 "$PY" -m pytest bench/ --bench-full -q -rs -s \
    --benchmark-json="$OUT/bench.json" --benchmark-columns=median,min,max,stddev,rounds \
    2>&1 | tee -a "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "== 3/3 summary"
if [ -f "$OUT/bench.json" ]; then
    "$PY" bench/summary.py "$OUT/bench.json" | tee "$OUT/summary.md"
else
    echo "no $OUT/bench.json (the benchmark run failed before writing it)"
fi
echo "gpu tests exit $tests_rc, benchmarks exit $bench_rc; outputs in $OUT"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
