"""Launches for Nsight Compute: one forward of each Triton op that misses its goal (issue 4),
and the ball attention's forward and backward (`ball_bwd`).

After a warm-up, one launch of each op's forward at the tuning sweep's sizes
(`case` of bench/triton_tune.py: H=8, D=64, bfloat16, sigma on; ball and selection at 1M
points, the compressed ops at 256k) between cudaProfilerStart and cudaProfilerStop, so that
`ncu --profile-from-start off` sees only those launches.

    ncu --clock-control none --profile-from-start off --kernel-name regex:^_ \\
        --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \\
        --section MemoryWorkloadAnalysis --section Occupancy \\
        python3 bench/kernel_profile.py [--only ball_fwd ball_bwd select_blocks compressed selection]
            [--points 1000000]

`bash bench/gpu.sh ncu` runs exactly that (NCU_ARGS: this script's arguments) and keeps the
report in ncu.log. Without ncu the script only runs the launches.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _meta import run_line, run_record  # noqa: E402
from triton_tune import case  # noqa: E402

OPS = ("ball_fwd", "ball_bwd", "select_blocks", "compressed", "selection")


def launches(name: str, generator, points: int | None = None):
    """A function launching `name`'s kernels once: its forward, or (`*_bwd`) forward and
    backward (the kernels' names tell them apart in the report)."""
    forward, leaves = case(name, generator, points)
    if name.endswith("_bwd"):
        grad_out = torch.randn_like(forward())
        return lambda: torch.autograd.grad(forward(), leaves, grad_out)

    def forward_only():
        with torch.no_grad():
            forward()
    return forward_only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help=", ".join(OPS))
    parser.add_argument("--points", type=int, default=None,
                        help="cloud size (triton_tune.case's default otherwise); 1000000 gives a "
                             "padded cloud, whose kernels load the padding mask")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernel_profile.py needs a CUDA device")
    generator = torch.Generator(device="cuda").manual_seed(0)
    print(run_line(run_record()), flush=True)  # into ncu.log beside the report
    for name in OPS:
        if args.only and name not in args.only:
            continue
        run = launches(name, generator, args.points)
        run()  # compiles
        run()
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        run()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(f"profiled {name}", flush=True)


if __name__ == "__main__":
    main()
