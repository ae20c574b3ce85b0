"""Launches for Nsight Compute: one forward of each Triton op that misses its goal (issue 4).

After a warm-up, one launch of each op's forward at the tuning sweep's sizes
(`case` of bench/triton_tune.py: H=8, D=64, bfloat16, sigma on; ball and selection at 1M
points, the compressed ops at 256k) between cudaProfilerStart and cudaProfilerStop, so that
`ncu --profile-from-start off` sees only those launches.

    ncu --clock-control none --profile-from-start off --kernel-name regex:^_ \\
        --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \\
        --section MemoryWorkloadAnalysis --section Occupancy \\
        python3 bench/kernel_profile.py [--only ball_fwd select_blocks compressed selection]

`bash bench/gpu.sh ncu` runs exactly that (NCU_ARGS: this script's arguments) and keeps the
report in ncu.log. Without ncu the script only runs the launches.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from triton_tune import case  # noqa: E402

OPS = ("ball_fwd", "select_blocks", "compressed", "selection")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help=", ".join(OPS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernel_profile.py needs a CUDA device")
    generator = torch.Generator(device="cuda").manual_seed(0)
    for name in OPS:
        if args.only and name not in args.only:
            continue
        forward, _ = case(name, generator)
        with torch.no_grad():
            forward()  # compiles
            forward()
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            forward()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        print(f"profiled {name}", flush=True)


if __name__ == "__main__":
    main()
