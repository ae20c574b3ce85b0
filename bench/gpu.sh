#!/usr/bin/env bash
# Everything a CUDA machine should run, in one call: the GPU tests, the demo and the GPU
# benchmarks. Uses the machine's own torch/triton/cupy/pytest (no installs, no internet).
# Results go to $OUT (default ./out): logs, JSON and markdown tables.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -m "gpu" -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" || status=1
python3 -m sparseball demo 2>&1 | tee "$OUT/demo.log" || status=1
python3 bench/torch_backend.py --out "$OUT" 2>&1 | tee "$OUT/torch_backend.log" || status=1
exit $status
