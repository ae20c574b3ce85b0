#!/usr/bin/env bash
# bench/make_base.sh REF: put REF's sparseball/ in bench/base/ (ignored by git), so that
# `bash bench/gpu.sh base triton` benchmarks it beside the working tree in the same run, on the
# same GPU (carry bench/base to the device machine). Results: base/ beside the others.
set -euo pipefail
cd "$(dirname "$0")/.."
ref=${1:?usage: bench/make_base.sh REF}
commit=$(git rev-parse --verify "$ref^{commit}")
rm -rf bench/base && mkdir -p bench/base
git archive "$commit" sparseball | tar -x -C bench/base
echo "$commit" > bench/base/COMMIT
echo "bench/base: sparseball/ of $commit"
