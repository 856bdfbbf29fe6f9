#!/usr/bin/env bash
# GPU check of the Triton backend: CUDA tests, then the rf.ppo_loss benchmark table (fused
# vs eager vs torch.compile; effective GB/s against the measured copy bandwidth; peak
# memory), a launch-config sweep, and the static model's table for the same GPU class
# (benchmarks/static_roofline.py) so that measured and modelled sit side by side. Meant for
# an H100/H200 with PyTorch and Triton and nothing else: no network, pytest and
# pytest-benchmark optional.
#
#   OUT=/path/to/results benchmarks/gpu_check.sh        # under 10 minutes (step limits sum to 570 s)
#
# Writes $OUT/gpu_results.md (summary), $OUT/ppo_loss_raw.jsonl (one JSON row per
# measurement), $OUT/ppo_loss_bars.json (the bars), $OUT/launch_sweep.{md,jsonl}, $OUT/*.log
# (each step's output) and $OUT/junit_*.xml. Every step has a time limit and a failing step
# does not stop the next; each step's exit code is in the summary (124 = cut by its time limit).
# Exit status: 0 when every step passed and every bar is met (fused fwd+bwd at N = 16384,
# V = 151936, bf16: >= 85 % of the measured copy bandwidth, >= 4x eager, >= 1.5x torch.compile);
# otherwise 1, after a "FAILED:" line naming each failing step and bar (benchmarks/gpu_summary.py).
set -u
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
STEPS="$OUT/steps.tsv"
: > "$STEPS"
T0=$(date +%s)

run_step() {  # run_step NAME LIMIT_SECONDS COMMAND...: log to $OUT/NAME.log, record rc and time
    local name=$1 limit=$2
    shift 2
    local start rc
    start=$(date +%s)
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$STEPS"
    tail -n 3 "$OUT/$name.log"
    return 0
}

# -- environment ------------------------------------------------------------------------
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "nvidia-smi failed"
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name())" 2>&1
    "$PY" -c "import pytest; print('pytest', pytest.__version__)" 2>&1 | tail -n 1
    "$PY" -c "import pytest_benchmark; print('pytest-benchmark', pytest_benchmark.__version__)" 2>&1 | tail -n 1
} > "$OUT/environment.log" 2>&1
cat "$OUT/environment.log"

# -- make `import rlhf_fast.kernels` work without installing --------------------------------
# setup.py maps kernels/ to rlhf_fast.kernels; a plain PYTHONPATH=. does not. If the package
# is not importable as installed, a throwaway folder of symlinks provides the mapping, and
# the steps run from there (so the repo's own rlhf_fast/ on the current directory does not
# shadow it) with absolute paths.
WORK="$REPO"
if ! (cd /tmp && "$PY" -c "import rlhf_fast.kernels.ppo_loss" > /dev/null 2>&1); then
    SHIM="$(mktemp -d)"
    mkdir -p "$SHIM/rlhf_fast"
    ln -s "$REPO"/rlhf_fast/* "$SHIM/rlhf_fast/"
    ln -s "$REPO/kernels" "$SHIM/rlhf_fast/kernels"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    WORK="$SHIM"
    echo "using an import shim at $SHIM (rlhf_fast is not installed)"
fi
cd "$WORK" || exit 1
export RLHF_FAST_BUILD_EXT="${RLHF_FAST_BUILD_EXT:-0}"  # never compile C++ here
unset TRITON_INTERPRET

HAVE_PYTEST=0
"$PY" -c "import pytest" > /dev/null 2>&1 && HAVE_PYTEST=1
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml")

# -- 1. the Triton kernels' own tests (CUDA: bf16/fp16 double baseline, V up to 151936) ---
if [ "$HAVE_PYTEST" = 1 ]; then
    run_step tests_triton 150 "${PYTEST[@]}" --junitxml="$OUT/junit_triton.xml" \
        "$REPO/tests/test_triton_kernels.py" "$REPO/tests/test_triton_aot.py" \
        "$REPO/tests/test_static_roofline.py"
else
    printf 'tests_triton\tno pytest\t0\n' >> "$STEPS"
fi

# -- 2. the benchmark table (no pytest needed) --------------------------------------------
run_step bench_ppo_loss 200 "$PY" "$REPO/benchmarks/ppo_loss_cases.py" --out "$OUT" --rounds 5

# -- 2b. launch-config sweep of the kernels alone (data for tuning launch_config) --------
run_step launch_sweep 50 "$PY" "$REPO/benchmarks/ppo_loss_cases.py" --sweep --out "$OUT"

# -- 3. the shared backend grid and the compile test, Triton on CUDA ----------------------
if [ "$HAVE_PYTEST" = 1 ]; then
    run_step tests_grid 90 "${PYTEST[@]}" --junitxml="$OUT/junit_grid.xml" -k "triton" \
        "$REPO/tests/test_ppo_loss_grid.py" "$REPO/tests/test_compile.py"
else
    printf 'tests_grid\tno pytest\t0\n' >> "$STEPS"
fi

# -- 4. the static model of the same kernels (no GPU needed; for measured vs modelled) ------
run_step static_model 80 "$PY" "$REPO/benchmarks/static_roofline.py" --vocab 151936 32000 --dtype bf16 fp32 \
    --json "$OUT/static_roofline.json" --markdown "$OUT/static_roofline.md"

# -- summary: gpu_results.md, a FAILED line per failing step or bar, the exit status ------
"$PY" "$REPO/benchmarks/gpu_summary.py" "$OUT" "$(( $(date +%s) - T0 ))"
status=$?
echo "== wrote $OUT/gpu_results.md"
cat "$OUT/gpu_results.md" 2> /dev/null
exit "$status"
