#!/usr/bin/env bash
# Download the peers that benchmarks compare against into .whl/ (on a machine with internet),
# so that an offline GPU machine can install them: bench/gpu.sh does it when .whl/ is there.
#   balltree-erwin: Erwin's C++/OpenMP tree builder (sdist; builds with Cython + numpy).
#   fla-core: flash-linear-attention's NSA kernels (pure Python + Triton).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip install --quiet cython numpy setuptools wheel
python3 -m pip download --no-deps --no-build-isolation -d .whl balltree-erwin==0.1.0 fla-core==0.6.0
