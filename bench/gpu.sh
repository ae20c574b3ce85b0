#!/usr/bin/env bash
# Everything a CUDA machine should run, in one call: the GPU tests, the demo and the GPU
# benchmarks. Uses the machine's own torch/triton/cupy/pytest (no installs, no internet).
# Results (logs, JSON and markdown tables) go to /tmp/sparseball-results, packed into
# $OUT/results.tar.gz
# ($OUT defaults to ./out). Each result records the commit it measured (bench/_meta.py): from
# git, or on a copy of the tree without .git from COMMIT, which `python3 bench/_meta.py stamp`
# writes beforehand (carry it with the tree, as bench/base).
#   bash bench/gpu.sh           # everything
#   bash bench/gpu.sh tests     # one part: tests, demo, torch, tune, base, triton, model, study,
#                               # tree, profile, ncu, farfield
# Step time limits: TESTS_LIMIT, DEMO_LIMIT, TORCH_LIMIT, TUNE_LIMIT, TRITON_LIMIT, TREE_LIMIT,
# PROFILE_LIMIT, FARFIELD_LIMIT (seconds).
# On an H100 (2026-11-23): tests ~270 s, triton ~200 s (TRITON_ARGS="--only compressed": ~45 s),
# tree ~100 s, profile ~30 s, tune ~280 s (TUNE_ARGS="--only select_blocks": ~60 s); the device
# tool allows 600 s per call, so split: `bash bench/gpu.sh tests tree`, then
# `bash bench/gpu.sh triton demo` (carry .whl for the peers). On an H200 (2026-11-30): tests
# 190 s, triton + tree 212 s, torch 59 s; (2026-12-01) tests ~300 s (the attention kernels
# build with and without the padding mask), triton 200 s.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/out}"
RESULTS=/tmp/sparseball-results
rm -rf "$RESULTS"; mkdir -p "$RESULTS" "$OUT"
parts="${*:-tests demo torch triton tree}"
status=0

# Peers for the benchmarks (bench/fetch_peers.sh puts them in .whl/; carry that folder).
if compgen -G ".whl/*" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/peers .whl/* \
    && export PYTHONPATH="$PYTHONPATH:/tmp/peers"
fi

step() {  # step NAME SECONDS COMMAND...: run one part within a time limit, log it
  local name=$1 limit=$2; shift 2
  [[ " $parts " == *" $name "* ]] || return 0
  echo "=== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log" || { status=1; echo "=== $name FAILED"; }
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS/gpu.txt"
# TESTS_ARGS: more pytest arguments (no spaces inside one), e.g. --deselect=tests/x.py::test_y.
# `-m gpu` chooses the tests, so the slow GPU ones run too (the "ci" profile deselects tests
# marked slow only when no -m is given: tests/conftest.py).
# shellcheck disable=SC2086
step tests "${TESTS_LIMIT:-420}" python3 -m pytest -q -m gpu -p no:cacheprovider ${TESTS_ARGS:-} tests
step demo "${DEMO_LIMIT:-120}" python3 -m sparseball demo
step torch "${TORCH_LIMIT:-240}" python3 bench/torch_backend.py --out "$RESULTS"
# TUNE_ARGS: more arguments of bench/triton_tune.py, e.g. "--only select_blocks"
# shellcheck disable=SC2086
step tune "${TUNE_LIMIT:-330}" python3 bench/triton_tune.py --out "$RESULTS" ${TUNE_ARGS:-}
# TRITON_ARGS: more arguments of bench/triton_ops.py, e.g. "--only compressed" (no spaces inside
# one: a --config JSON goes in a direct call instead). The part `base` runs the same benchmark on
# an earlier commit's sparseball/ (bench/make_base.sh REF puts it in bench/base/; carry that),
# results in base/, so a kernel change is measured against its predecessor in one run.
if [[ " $parts " == *" base "* && ! -d bench/base/sparseball ]]; then
  echo "=== base FAILED: no bench/base/sparseball (run bench/make_base.sh REF and carry bench/base)"
  status=1
fi
# shellcheck disable=SC2086
[[ -d bench/base/sparseball ]] && PYTHONPATH="$PWD/bench/base:$PYTHONPATH" step base \
  "${TRITON_LIMIT:-300}" python3 bench/triton_ops.py --out "$RESULTS/base" ${TRITON_ARGS:-}
# shellcheck disable=SC2086
[[ -f bench/triton_ops.py ]] && step triton "${TRITON_LIMIT:-300}" python3 bench/triton_ops.py --out "$RESULTS" ${TRITON_ARGS:-}
# The model: one training step of ErwinNSA and its baselines (MODEL_ARGS: bench/model.py's
# arguments, e.g. "--compile" or "--profile --only nsa --sizes 16x4096"), and the gravity
# study (STUDY_ARGS: bench/study.py's; run directories with checkpoints stay in /tmp).
# shellcheck disable=SC2086
step model "${MODEL_LIMIT:-240}" python3 bench/model.py --out "$RESULTS" ${MODEL_ARGS:-}
# shellcheck disable=SC2086
step study "${STUDY_LIMIT:-420}" python3 bench/study.py --out "$RESULTS" --runs /tmp/study-runs ${STUDY_ARGS:-}
# The tree far field against flat NSA, N = 64k ... 16M points (FARFIELD_ARGS: bench/far_field.py's
# arguments, e.g. "--sizes 65536 262144 1048576" or "--only tree"; not timed on a GPU yet: split
# the sizes over calls if 600 s do not suffice).
# shellcheck disable=SC2086
step farfield "${FARFIELD_LIMIT:-590}" python3 bench/far_field.py --out "$RESULTS" ${FARFIELD_ARGS:-}
[[ -f bench/tree_gpu.py ]] && step tree "${TREE_LIMIT:-150}" python3 bench/tree_gpu.py --out "$RESULTS"
step profile "${PROFILE_LIMIT:-120}" python3 bench/tree_profile.py --out "$RESULTS"
# Nsight Compute counters of the Triton forwards (not part of the default run; NCU_ARGS: the
# script's arguments, e.g. "--only select_blocks").
NCU_BIN=$(command -v ncu || compgen -G "/opt/nvidia/nsight-compute/*/ncu" | head -n 1)
# shellcheck disable=SC2086
step ncu "${NCU_LIMIT:-300}" "${NCU_BIN:-ncu}" --clock-control none --profile-from-start off \
  --kernel-name regex:^_ --section SpeedOfLight --section WarpStateStats \
  --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section Occupancy \
  python3 bench/kernel_profile.py ${NCU_ARGS:-}
tar czf "$OUT/results.tar.gz" -C "$RESULTS" .
exit $status
