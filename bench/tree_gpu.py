"""Tree builders on a GPU machine: the CuPy builder (on the device) against the Numba builder (on
the host CPUs of the same machine) and balltree-erwin (`from balltree import build_balltree`,
where importable), ball size 128, 3-D float32 points uniform in the unit cube.

Cases: one cloud of 1,048,576 points, 16 clouds x 4096, 64 clouds x 16384; then the growth of
one cloud from 64k to 16M points. CuPy times are CUDA-event times of warm builds (median), from
`build_tree(pos, batch, backend="cupy")` on CUDA tensors, so they include the front end's checks
and the builder's one host sync; Numba times are wall times from CPU tensors; Erwin's are wall
times from CUDA tensors (it copies to the host and back). Every case also checks that the CuPy
and Numba trees are identical.

    PYTHONPATH=. python3 bench/tree_gpu.py --out out/
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import torch
from _meta import run_line, run_record

import sparseball
from sparseball.tree import cupy_builder, cupy_graphs

BALL_SIZE = 128
CASES = (("1 x 1,048,576", 1, 1 << 20), ("16 x 4096", 16, 4096), ("64 x 16384", 64, 16384))
GROWTH = (1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24)


def cuda_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median CUDA-event time of `fn()` in milliseconds on the current stream, after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def wall_ms(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` in milliseconds (the device synchronized around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def erwin_builder():
    try:
        from balltree import build_balltree
    except Exception as error:  # not installed, or built for another numpy/torch
        return None, f"{type(error).__name__}: {error}"
    return build_balltree, None


def inputs(num_clouds: int, points_per_cloud: int, seed: int = 0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    n = num_clouds * points_per_cloud
    pos = torch.rand(n, 3, device="cuda", generator=generator)
    batch = torch.arange(num_clouds, device="cuda").repeat_interleave(points_per_cloud)
    return pos, batch


def same_tree(a, b) -> bool:
    return (torch.equal(a.perm.cpu(), b.perm.cpu()) and torch.equal(a.mask.cpu(), b.mask.cpu())
            and torch.equal(a.offsets.cpu(), b.offsets.cpu())
            and torch.equal(a.rotation_perms.cpu(), b.rotation_perms.cpu()))


def measure(name, num_clouds, points, erwin, repeats, with_numba=True, with_erwin=True,
            cpu_repeats=None):
    """One row; `cpu_repeats` (default repeats // 4, at least 3) times the CPU builders, which
    take seconds per call on the largest clouds."""
    cpu_repeats = max(3, repeats // 4) if cpu_repeats is None else cpu_repeats
    pos, batch = inputs(num_clouds, points)
    pos_cpu, batch_cpu = pos.cpu(), batch.cpu()
    row = {"case": name, "clouds": num_clouds, "points": num_clouds * points}

    def cupy_build(rotations=0):
        return sparseball.build_tree(pos, batch, ball_size=BALL_SIZE, rotations=rotations, backend="cupy")

    tree = cupy_build()
    row["slots"] = tree.num_slots
    row["cupy_ms"] = cuda_ms(cupy_build, repeats)
    if num_clouds * points <= cupy_graphs.MAX_POINTS:  # repeated sizes replay a CUDA graph
        cupy_graphs.ENABLED = False
        row["cupy_no_graph_ms"] = cuda_ms(cupy_build, repeats)
        cupy_graphs.ENABLED = True
    # The builder alone, without build_tree's input checks (finiteness, batch min/max syncs).
    row["cupy_core_ms"] = cuda_ms(
        lambda: cupy_builder.build_tree_cupy(pos, batch, num_clouds, BALL_SIZE, 0), repeats)
    row["cupy_rot1_ms"] = cuda_ms(lambda: cupy_build(1), max(3, repeats // 2))
    if with_numba:
        def numba_build():
            return sparseball.build_tree(pos_cpu, batch_cpu, ball_size=BALL_SIZE, backend="numba")

        row["numba_ms"] = wall_ms(numba_build, cpu_repeats)
        row["identical"] = same_tree(tree, numba_build())
        row["identical_rot1"] = same_tree(
            cupy_build(1),
            sparseball.build_tree(pos_cpu, batch_cpu, ball_size=BALL_SIZE, rotations=1, backend="numba"))
    if with_erwin and erwin is not None:
        try:
            row["erwin_ms"] = wall_ms(lambda: erwin(pos, batch), cpu_repeats,
                                      warmup=1 if cpu_repeats > 1 else 0)
        except Exception as error:
            row["erwin_error"] = f"{type(error).__name__}: {error}"
    torch.cuda.empty_cache()
    print(row, flush=True)
    return row


def fmt(value, digits=2):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    return f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--max-growth", type=int, default=GROWTH[-1],
                        help="largest cloud of the growth series")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/tree_gpu.py needs a CUDA device")

    erwin, erwin_missing = erwin_builder()
    cases = [measure(name, b, n, erwin, args.repeats) for name, b, n in CASES]
    growth = []
    for n in (n for n in GROWTH if n <= args.max_growth):
        if n == CASES[0][2]:  # measured above
            growth.append({**cases[0], "case": f"1 x {n:,}"})
            continue
        large = n > 1 << 20
        growth.append(measure(f"1 x {n:,}", 1, n, erwin, max(3, args.repeats // 4) if large else args.repeats,
                              cpu_repeats=1 if large else None))

    import cupy
    import numba

    record = {
        **run_record(),
        "cupy": cupy.__version__, "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(), "cpu_count": os.cpu_count(),
        "ball_size": BALL_SIZE, "dim": 3, "dtype": "float32",
        "erwin": "balltree-erwin" if erwin is not None else f"not importable ({erwin_missing})",
        "cases": cases, "growth": growth,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tree_gpu.json").write_text(json.dumps(record, indent=2))

    def table(rows):
        lines = ["| clouds x points | slots | cupy ms | cupy ms, no graph | cupy builder only ms | "
                 "cupy ms (1 rotation) | numba ms | erwin ms | cupy vs numba | identical (R=0, R=1) |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            speedup = r["numba_ms"] / r["cupy_ms"] if "numba_ms" in r else None
            lines.append(
                f"| {r['case']} | {r['slots']:,} | {fmt(r['cupy_ms'])} | {fmt(r.get('cupy_no_graph_ms'))} | "
                f"{fmt(r['cupy_core_ms'])} | "
                f"{fmt(r['cupy_rot1_ms'])} | "
                f"{fmt(r.get('numba_ms'), 1)} | {fmt(r.get('erwin_ms'), 1)} | "
                f"{fmt(speedup, 1)}x | {fmt(r.get('identical'))}, {fmt(r.get('identical_rot1'))} |")
        return lines

    lines = [
        f"# Tree builders ({record['gpu']}, {record['date']})",
        "",
        run_line(record),
        "",
        f"Ball size {BALL_SIZE}, 3-D float32 points uniform in the unit cube. CuPy: CUDA-event time "
        "of warm `build_tree(..., backend=\"cupy\")` on CUDA tensors (median; builds of up to "
        f"{cupy_graphs.MAX_POINTS:,} points replay a CUDA graph from the second build of a size on, "
        "'no graph' builds them eagerly). Numba: wall time from "
        f"CPU tensors, {record['numba_threads']} threads. Erwin (balltree-erwin): wall time from "
        f"CUDA tensors; {record['erwin']}.",
        "",
        *table(cases),
        "",
        "## Growth (one cloud)",
        "",
        *table(growth),
    ]
    (args.out / "tree_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
