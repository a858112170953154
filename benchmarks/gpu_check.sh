#!/usr/bin/env bash
# The GPU checks of regbn, in under 4 minutes on one CUDA device:
#   1. the CUDA tests (pytest -m cuda, in the test files that have any);
#   2. bench_layer.py --device cuda (B up to 4096, synchronised timer), with the official
#      example's options;
#   3. the host synchronisations per training step (torch.cuda.set_sync_debug_mode("warn"));
#   4. the per-phase profile of a training step on the GPU;
#   5. the fx benchmark (regbn.insert on meta-device models; CPU work, run here for completeness).
# JSON goes to $RESULTS (default benchmarks/results): bench_layer_cuda.json,
# bench_layer_sync_cuda.json, bench_layer_profile_cuda.json,
# bench_fx_cuda.json.
#
#   bash benchmarks/gpu_check.sh                       # with `python`
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#   PYTHON=python3 RESULTS=/tmp/out bash benchmarks/gpu_check.sh
#
# Works from a plain checkout (the repository root goes on PYTHONPATH, no install needed) with a
# Python that has torch built with CUDA, numpy, networkx, tqdm and pytest. Without a CUDA device
# it stops at once with exit code 2 and says so.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RESULTS=${RESULTS:-benchmarks/results}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"

if ! "$PYTHON" - <<'EOF'
import sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"built with CUDA {torch.version.cuda}, CUDA available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit(2)
print(f"device: {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible)")
EOF
then
    echo "gpu_check: no CUDA device is available to $PYTHON; run this script on a machine with" \
         "a GPU and a CUDA build of torch (nothing was run)" >&2
    exit 2
fi

declare -a SUMMARY=()
FAILED=0

# step NAME SECONDS CMD...: runs CMD under `timeout`, records its status and wall time.
step() {
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS rc=0
    timeout "$limit" "$@" || rc=$?
    local status="ok"
    if [ "$rc" -eq 124 ]; then status="TIMED OUT"; elif [ "$rc" -ne 0 ]; then status="FAILED ($rc)"; fi
    [ "$rc" -eq 0 ] || FAILED=1
    SUMMARY+=("$(printf '%-34s %-12s %4ds' "$name" "$status" $((SECONDS - t0)))")
}

mapfile -t CUDA_TESTS < <(grep -l "pytest.mark.cuda" tests/test_*.py)
step "pytest -m cuda" 60 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider "${CUDA_TESTS[@]}"
step "bench_layer cuda, official options" 75 "$PYTHON" benchmarks/bench_layer.py --device cuda \
    --options official --case-time 0.6 --out "$RESULTS/bench_layer_cuda.json"
step "syncs per training step" 30 "$PYTHON" benchmarks/bench_layer.py --device cuda \
    --sync-debug --out "$RESULTS/bench_layer_sync_cuda.json"
step "profile, official options" 30 "$PYTHON" benchmarks/bench_layer.py --device cuda \
    --profile --case-time 1 --out "$RESULTS/bench_layer_profile_cuda.json"
step "bench_fx" 45 "$PYTHON" benchmarks/bench_fx.py --repeats 3 --out "$RESULTS/bench_fx_cuda.json"

echo
echo "=== summary ($SECONDS s in all; JSON in $RESULTS)"
printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
