#!/usr/bin/env bash
# jemfast on a CUDA GPU, in stages that each fit one short command on a metered GPU machine.
#
#   bash bench/gpu.sh STAGE OUTDIR
#
# Stages (expected minutes on an H100, bench/RESULTS.md has the reasoning). The 15-minute plan
# uses two (bench/RESULTS.md, "Plan for 15 device-minutes"):
#   first              THE first command (<= JEMFAST_STAGE_LIMIT_S, default 330 s): install check,
#                      versions + GEMM/copy rates, kernel tests, GPU tests (no torch.compile), the
#                      WRN-28-10 iteration (original strict fp32, original TF32, jemfast graph bf16
#                      channels-last) and the WRN-28-10 chain vs the measured bf16 GEMM rate; each
#                      step capped (JEMFAST_CAP_<STEP> overrides a cap), results written as they come
#   second             optional, right after: kernel resources with this machine's Triton, the
#                      README's --compile iteration, the compile tests, the layout study  (~5.5)
# Older stages, for longer leases:
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

STAGES="first second check bench layout compile bench-compile bench-compile-iter suite"
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
case "$STAGE" in first|second) LIMIT="${JEMFAST_STAGE_LIMIT_S:-330}" ;; *) LIMIT="${JEMFAST_STAGE_LIMIT_S:-450}" ;; esac
RESERVE=25  # seconds kept for the final summary of the first/second stages
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
STATUS="$OUT/$TAG.status"  # one line per finished step: name, exit code, seconds (first/second)

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

# capped CAP NAME CMD...: like step, but at most CAP seconds (JEMFAST_CAP_<NAME> overrides it)
# and never into the RESERVE seconds kept for the summary; its outcome goes to the status file.
capped() {
    local cap=$1 name=$2 var t0=$SECONDS rc left
    shift 2
    var="JEMFAST_CAP_$(echo "$name" | tr 'a-z-' 'A-Z_')"
    cap=${!var:-$cap}
    left=$((DEADLINE - RESERVE - SECONDS))
    if [ "$left" -le 10 ]; then
        say "== $name: not run (stage limit ${LIMIT}s reached)"
        FAILED+=("$name (not run: time)")
        printf '%s\tnot-run\t0\n' "$name" >>"$STATUS"
        return
    fi
    [ "$cap" -lt "$left" ] && left=$cap
    say "== $name ($(date -u +%H:%M:%S), ${left}s): $*"
    timeout -s INT -k 20 "$left" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && say "== $name: stopped after ${left}s (its cap ${cap}s or the stage limit)"
    say "== $name: exit $rc after $((SECONDS - t0))s"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$STATUS"
    [ "$rc" -eq 0 ] || FAILED+=("$name (exit $rc)")
}

# the summary of whatever the stage wrote: tables into the log and into TAG_summary.md
summarise() {
    say "== summary ($(date -u +%H:%M:%S))"
    timeout -k 5 "$RESERVE" "$PY" bench/summary.py "$OUT" >"$OUT/${TAG}_summary.md" 2>&1
    cat "$OUT/${TAG}_summary.md" >>"$LOG"
    cat "$OUT/${TAG}_summary.md"
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
# the WRN-28-10 benchmarks of the first/second stages; JEMFAST_BENCH_QUICK=1 (the CPU rehearsal
# of tests/test_gpu_stages.py) runs them in quick mode (tiny workloads) instead
if [ "${JEMFAST_BENCH_QUICK:-0}" = 1 ]; then MODE=(); else MODE=(--bench-full); fi
QUICK_BENCH=(env JEMFAST_BENCH_ROUNDS="${JEMFAST_BENCH_ROUNDS:-5}" TORCH_LOGS=recompiles "${PYTEST[@]}" "${MODE[@]}"
             -s --benchmark-columns=median,min,max,stddev,rounds --benchmark-json)

case "$STAGE" in
first)
    if command -v nvidia-smi >/dev/null; then capped 20 nvidia-smi nvidia-smi; else say "== nvidia-smi: not on PATH"; fi
    capped 60 machine "$PY" bench/machine.py "$OUT/${TAG}_check.json"
    capped 90 kernel-tests "${PYTEST[@]}" tests/test_kernel_sgld.py tests/test_kernel_buffer.py \
        tests/test_kernel_compile.py -m "not slow"
    capped 100 gpu-tests "${PYTEST[@]}" tests/test_gpu.py tests/test_gpu_iteration_sync.py -m "gpu and not compile"
    capped 120 wrn-iteration "${QUICK_BENCH[@]}" "$OUT/${TAG}_iteration.json" bench/test_train_iteration.py \
        -m "not compile" -k "original-strict-fp32 or original-tf32 or jemfast-graph-bf16-cl"
    capped 75 wrn-chain "${QUICK_BENCH[@]}" "$OUT/${TAG}_chain.json" bench/test_sgld_chain.py -m "not compile" \
        -k "wrn and bf16 and channels_last and (graph or reference)"
    summarise
    ;;
second)
    capped 60 kernel-resources "$PY" -m jemfast.kernels.aot --json "$OUT/${TAG}_aot.json" --jobs 8
    capped 200 compile-iteration "${QUICK_BENCH[@]}" "$OUT/${TAG}_iteration.json" bench/test_train_iteration.py \
        -m compile -k "jemfast-best"
    capped 90 compile-tests env TORCH_LOGS=recompiles "${PYTEST[@]}" tests/test_gpu.py -m "gpu and compile"
    capped 60 layout "$PY" bench/layout.py "$OUT/${TAG}_layout.json"
    summarise
    ;;
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
