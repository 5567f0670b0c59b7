#!/usr/bin/env bash
# jemfast on a CUDA GPU, in stages that each fit one short command on a metered GPU machine.
#
#   bash bench/gpu.sh STAGE OUTDIR
#
# Stages (expected minutes on an H100, bench/RESULTS.md has the reasoning):
#   check              install check, versions, nvidia-smi, bf16/TF32/fp32 GEMM rates (8192^3),
#                      kernel tests on CUDA, GPU tests without torch.compile          (~2-3)
#   bench              full benchmarks without Inductor: chains, iterations, buffer   (~3-4)
#   layout             WRN-28-10 bf16 graph chain: NCHW vs channels-last x cudnn.benchmark,
#                      and a torch.profiler split of one replay                        (~2)
#   compile            GPU tests that use torch.compile, with TORCH_LOGS=recompiles    (~2-4)
#   bench-compile      compiled SGLD chains (Inductor), full mode                      (~4-6)
#   bench-compile-iter training iterations with --compile, full mode                   (~3-5)
#   suite              optional: the non-slow test suite on this machine (tests/ -m "not slow")
#
# Every stage writes into OUTDIR files named GPU_DATE_STAGE.{log,json} (at most 3 per stage),
# stops its own steps before JEMFAST_STAGE_LIMIT_S seconds (default 450) so a 10-minute command
# limit always leaves the logs, and exits non-zero if any step failed or ran out of time.
# Runs with python3 (PYTHON=... to change). Installs jemfast with
# `pip install --no-deps --no-build-isolation -e .` if it is not importable from outside the
# repository as this checkout (no package index is needed); JEMFAST_NO_INSTALL=1 uses
# PYTHONPATH instead. JEMFAST_ALLOW_CPU=1 (a testing aid for tests/test_gpu_stages.py) runs a
# stage without CUDA, its files named cpu_DATE_STAGE.
set -uo pipefail

STAGES="check bench layout compile bench-compile bench-compile-iter suite"
usage() {
    echo "usage: bash bench/gpu.sh STAGE OUTDIR   (STAGE: ${STAGES// / | })" >&2
    exit 2
}
case "${1:-}" in -h|--help) echo "usage: bash bench/gpu.sh STAGE OUTDIR   (STAGE: ${STAGES// / | })"; exit 0 ;; esac
[ $# -eq 2 ] || usage
STAGE=$1
case " $STAGES " in *" $STAGE "*) ;; *) echo "bench/gpu.sh: unknown stage '$STAGE'" >&2; usage ;; esac
[ -n "$2" ] || usage
mkdir -p "$2" || { echo "bench/gpu.sh: cannot create OUTDIR '$2'" >&2; exit 2; }
OUT=$(cd "$2" && pwd)
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd -P)
PY="${PYTHON:-python3}"
LIMIT="${JEMFAST_STAGE_LIMIT_S:-450}"
DEADLINE=$((SECONDS + LIMIT))

command -v "$PY" >/dev/null || { echo "bench/gpu.sh $STAGE: no '$PY' on PATH (set PYTHON=...)" >&2; exit 3; }
GPU=$("$PY" - 2>/dev/null <<'PYEOF'
import re, torch
if torch.cuda.is_available():
    name = torch.cuda.get_device_name(0).replace("NVIDIA", "")
    print(re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-") or "gpu")
PYEOF
)
DATE=$(date -u +%Y%m%dT%H%MZ)
[ -z "$GPU" ] && [ "${JEMFAST_ALLOW_CPU:-0}" = 1 ] && GPU=cpu
if [ -z "$GPU" ]; then
    msg="bench/gpu.sh $STAGE: no CUDA device visible to $PY (torch.cuda.is_available() is False, or torch does not import); nothing run"
    echo "$msg" >"$OUT/nocuda_${DATE}_${STAGE}.log"
    echo "$msg" >&2
    exit 3
fi
TAG="${GPU}_${DATE}_${STAGE}"
LOG="$OUT/$TAG.log"
export JEMFAST_STAGE_COMMAND="bash bench/gpu.sh $STAGE OUTDIR"  # recorded with every benchmark
export PYTHONUNBUFFERED=1
FAILED=()

say() { echo "$*" | tee -a "$LOG"; }

# step NAME CMD...: run CMD with what is left of the stage's time, log it, remember a failure.
step() {
    local name=$1 left=$((DEADLINE - SECONDS)) t0=$SECONDS rc
    shift
    if [ "$left" -le 15 ]; then
        say "== $name: not run (stage limit ${LIMIT}s reached)"
        FAILED+=("$name (not run: time)")
        return
    fi
    say "== $name ($(date -u +%H:%M:%S), ${left}s left): $*"
    timeout -s INT -k 30 "$left" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && say "== $name: stopped at the stage limit (${LIMIT}s)"
    say "== $name: exit $rc after $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || FAILED+=("$name (exit $rc)")
}

# jemfast importable from outside the repository, as this checkout? Else an editable install.
ensure_installed() {
    local where
    where=$(cd / && "$PY" -c 'import jemfast, jemfast.kernels, jemfast.tune, os; print(os.path.dirname(os.path.dirname(os.path.realpath(jemfast.__file__))))' 2>/dev/null)
    if [ "$where" = "$REPO" ]; then
        say "== install: jemfast from $REPO already importable"
        return
    fi
    if [ "${JEMFAST_NO_INSTALL:-0}" != 1 ]; then
        step install "$PY" -m pip install --no-deps --no-build-isolation -e .
    fi
    where=$(cd / && "$PY" -c 'import jemfast, jemfast.kernels, jemfast.tune, os; print(os.path.dirname(os.path.dirname(os.path.realpath(jemfast.__file__))))' 2>&1 | tail -1)
    if [ "$where" != "$REPO" ]; then
        say "== install: jemfast from outside the repository is '$where', not $REPO; using PYTHONPATH=$REPO"
        export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    fi
}

PYTEST=("$PY" -m pytest -q -rfEsx -p no:cacheprovider)
# full benchmark mode; the caller appends the JSON path, then the selection
BENCH=(env JEMFAST_BENCH_FULL=1 TORCH_LOGS=recompiles "${PYTEST[@]}" --bench-full -s
       --benchmark-columns=median,min,max,stddev,rounds --benchmark-json)

say "== jemfast bench/gpu.sh $STAGE on $GPU, $(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), limit ${LIMIT}s"
ensure_installed
case "$STAGE" in
check)
    step nvidia-smi nvidia-smi
    step machine "$PY" bench/machine.py "$OUT/$TAG.json"
    step kernel-tests "${PYTEST[@]}" tests/test_kernel_sgld.py tests/test_kernel_buffer.py
    step gpu-tests "${PYTEST[@]}" tests -m "gpu and not compile"
    ;;
bench)
    step bench "${BENCH[@]}" "$OUT/$TAG.json" -m "not compile" bench
    [ -f "$OUT/$TAG.json" ] && step summary "$PY" bench/summary.py "$OUT"
    ;;
layout)
    step layout "$PY" bench/layout.py "$OUT/$TAG.json" --trace "$OUT/${TAG}_trace.json.gz"
    ;;
compile)
    step compile-tests env TORCH_LOGS=recompiles "${PYTEST[@]}" tests -m "gpu and compile"
    ;;
bench-compile)
    step bench-compile "${BENCH[@]}" "$OUT/$TAG.json" -m compile bench/test_sgld_chain.py
    [ -f "$OUT/$TAG.json" ] && step summary "$PY" bench/summary.py "$OUT"
    ;;
bench-compile-iter)
    step bench-compile-iter "${BENCH[@]}" "$OUT/$TAG.json" -m compile bench/test_train_iteration.py
    [ -f "$OUT/$TAG.json" ] && step summary "$PY" bench/summary.py "$OUT"
    ;;
suite)
    step suite "${PYTEST[@]}" tests -m "not slow"
    ;;
esac

if [ ${#FAILED[@]} -eq 0 ]; then
    say "== $STAGE: all steps passed in ${SECONDS}s; outputs in $OUT"
    exit 0
fi
say "== $STAGE: FAILED: ${FAILED[*]} (${SECONDS}s); outputs in $OUT"
exit 1
