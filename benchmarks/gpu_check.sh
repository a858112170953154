#!/usr/bin/env bash
# The GPU checks of regbn, in under 8 minutes on one CUDA device:
#   1. the CUDA tests (pytest -m cuda, in the test files that have any) and tests/test_compile.py;
#   2. the training step as one CUDA graph (benchmarks/gpu_graph_check.py):
#      torch.compile(mode="reduce-overhead", fullgraph=True) against eager, zero host syncs in the
#      captured steps (torch.cuda.set_sync_debug_mode("error")), its time at B=50;
#   3. bench_layer.py --device cuda against the official file itself (the official example's
#      options; B=50 at the official README's shape first: <= 1 ms per step and >= 50x the
#      official file are the aims there), with the batch sweep;
#   4. the host synchronisations per eager training step (torch.cuda.set_sync_debug_mode("warn"));
#   5. the per-phase profile of an eager training step on the GPU.
# JSON goes to $RESULTS (default benchmarks/results): graph_cuda.json, bench_layer_cuda.json,
# bench_layer_sync_cuda.json, bench_layer_profile_cuda.json.
#
#   bash benchmarks/gpu_check.sh                       # with `python`
#   REGBN_OFFICIAL=/path/to/mogvision/regbn/RegBN.py bash benchmarks/gpu_check.sh
#   PYTHON=.venv/bin/python RESULTS=/tmp/out bash benchmarks/gpu_check.sh
#
# The official RegBN.py is read from $REGBN_OFFICIAL, else ../shared/official/RegBN.py beside the
# repository (copy it there, never into the repository: it is GPL-3). Works from a plain checkout
# (the repository root goes on PYTHONPATH, no install needed) with a Python that has torch built
# with CUDA, numpy, networkx, tqdm and pytest. Without a CUDA device it stops at once with exit
# code 2 and says so.
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
step "tests/test_compile.py" 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_compile.py
step "one CUDA graph, no host sync" 150 "$PYTHON" benchmarks/gpu_graph_check.py \
    "$RESULTS/graph_cuda.json"
step "bench_layer cuda vs the official file" 180 "$PYTHON" benchmarks/bench_layer.py \
    --device cuda --options official --case-time 0.6 --out "$RESULTS/bench_layer_cuda.json"
step "syncs per eager training step" 30 "$PYTHON" benchmarks/bench_layer.py --device cuda \
    --sync-debug --out "$RESULTS/bench_layer_sync_cuda.json"
step "profile, official options" 30 "$PYTHON" benchmarks/bench_layer.py --device cuda \
    --profile --case-time 1 --out "$RESULTS/bench_layer_profile_cuda.json"

echo
echo "=== summary ($SECONDS s in all; JSON in $RESULTS)"
printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
