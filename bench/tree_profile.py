"""Where the time of a small CuPy tree build goes (16 x 4096, 1 x 65,536 and 1 x 262,144 points):
wall time per build (a replayed CUDA graph, the default for repeated sizes) with and without
the small-node cap lowering, with CuPy views made through DLPack and without the graph; the
device's kernels (torch.profiler, which sees CuPy's launches too) and the host's Python
(cProfile). Small builds are host-bound: this shows by how much.

    PYTHONPATH=.:bench python3 bench/tree_profile.py --out out/
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pathlib
import pstats
import time

import torch
from _meta import run_line, run_record
from torch.profiler import ProfilerActivity, profile
from tree_gpu import cuda_ms, inputs

import sparseball
from sparseball.tree import cupy_builder, cupy_graphs

CASES = ((16, 4096), (1, 1 << 16), (1, 1 << 18))


def wall_ms(fn, repeats: int = 200) -> float:
    """Mean wall time per call of back-to-back calls (the device synchronized at both ends)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = io.StringIO()

    def say(text: str) -> None:
        print(text, flush=True)
        report.write(text + "\n")

    say(f"# CuPy tree build profile ({torch.cuda.get_device_name()})")
    say("\n" + run_line(run_record()))
    for clouds, points in CASES:
        pos, batch = inputs(clouds, points)
        batch = batch if clouds > 1 else None
        def build(pos=pos, batch=batch):
            return sparseball.build_tree(pos, batch, backend="cupy")

        ops = cupy_builder._cupy_ops()
        for label, multiprocessors in (("cap lowered for the SMs", ops.multiprocessors),
                                       ("largest cap", 0)):
            saved, ops.multiprocessors = ops.multiprocessors, multiprocessors
            cupy_graphs.clear()  # a graph holds the cap it was captured with
            build()
            say(f"\n## {clouds} x {points}, {label} (cap {ops.node_cap(3, clouds * points)}): "
                f"wall {wall_ms(build):.3f} ms, CUDA events {cuda_ms(build, 50):.3f} ms")
            ops.multiprocessors = saved
            cupy_graphs.clear()
        # The CuPy views of the torch inputs and results: from pointers (the default) or
        # through DLPack.
        pointer_view = cupy_builder._cupy_view
        cupy_builder._cupy_view = lambda cupy, tensor: cupy.from_dlpack(tensor)
        build()
        say(f"\n## {clouds} x {points}, CuPy views through DLPack: wall {wall_ms(build):.3f} ms, "
            f"CUDA events {cuda_ms(build, 50):.3f} ms")
        cupy_builder._cupy_view = pointer_view
        cupy_graphs.ENABLED = False
        build()
        say(f"\n## {clouds} x {points}, no CUDA graph: wall {wall_ms(build):.3f} ms, "
            f"CUDA events {cuda_ms(build, 50):.3f} ms")
        cupy_graphs.ENABLED = True
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                build()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="device_time_total", row_limit=15,
                                          max_name_column_width=50)
        say("\n### kernels, 20 builds\n```\n" + table + "\n```")
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(50):
            build()
        torch.cuda.synchronize()
        profiler.disable()
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(25)
        say("\n### host, 50 builds (cProfile, cumulative)\n```\n" + stream.getvalue()[-6000:] + "\n```")
    (args.out / "tree_profile.md").write_text(report.getvalue())


if __name__ == "__main__":
    main()
