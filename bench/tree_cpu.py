"""CPU ball tree build: sparseball's Numba builder against balltree-erwin on this machine.

Three batches of uniform 3-D points (float32, ball_size 128): one cloud of 1,048,576 points,
16 clouds of 4,096 and 64 clouds of 16,384. Each contender runs warm (JIT compiled, one
untimed call), in interleaved rounds so that both see the same machine load; the table gives
medians. Times:

- `numba builder`: `sparseball.tree.numba_builder.build_numba` on numpy arrays, the builder
  `build_tree` calls, with Numba's default threads and with one thread (a machine busy with
  other work gives the builder about one core, while erwin builds one cloud on one core
  anyway);
- `build_tree`: the public `sparseball.build_tree` on torch tensors (argument checks and tensor
  wrapping included), without and with one rotated ordering;
- `erwin`: `balltree.build_balltree` on torch tensors (its wrapper casts to float64).

    PYTHONPATH=. python bench/tree_cpu.py [--repeats 15] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import numba
import numpy as np
import torch
from _meta import run_line, run_record
from balltree import build_balltree

import sparseball
from sparseball.tree.numba_builder import build_numba

CASES = (("1 x 1,048,576", 1, 1 << 20), ("16 x 4,096", 16, 4096), ("64 x 16,384", 64, 16384))
BALL_SIZE = 128
# Goals: the Numba builder's time over erwin's.
GOALS = {"1 x 1,048,576": 0.5, "16 x 4,096": 1.0}


def cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def contenders(pos: torch.Tensor, batch: torch.Tensor, clouds: int) -> dict:
    """The timed calls on one batch."""
    pos_np, batch_np = pos.numpy(), batch.numpy()

    def one_thread():
        threads = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            build_numba(pos_np, batch_np, clouds, BALL_SIZE, 0)
        finally:
            numba.set_num_threads(threads)

    return {
        "numba builder": lambda: build_numba(pos_np, batch_np, clouds, BALL_SIZE, 0),
        "numba builder, 1 thread": one_thread,
        "build_tree": lambda: sparseball.build_tree(pos, batch, ball_size=BALL_SIZE),
        "build_tree, 1 rotation": lambda: sparseball.build_tree(
            pos, batch, ball_size=BALL_SIZE, rotations=1),
        "erwin": lambda: build_balltree(pos, batch),
    }


def medians(calls: dict, repeats: int) -> dict[str, float]:
    """Median wall time in ms of each contender, timed in interleaved rounds after a warm-up."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    load_before = os.getloadavg()
    rows = []
    for label, clouds, size in CASES:
        pos = torch.rand(clouds * size, 3, generator=generator)
        batch = torch.arange(clouds).repeat_interleave(size)
        repeats = args.repeats if clouds * size < 1 << 20 else max(5, args.repeats // 2)
        times = medians(contenders(pos, batch, clouds), repeats)
        rows.append({"case": label, "clouds": clouds, "points_per_cloud": size,
                     "milliseconds": times,
                     "ratio_numba_over_erwin": times["numba builder"] / times["erwin"],
                     "ratio_build_tree_over_erwin": times["build_tree"] / times["erwin"],
                     "goal_ratio": GOALS.get(label)})
        print(label, {name: round(ms, 2) for name, ms in times.items()})

    record = {
        **run_record(),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "numba_threads": numba.get_num_threads(),
                    "numba_threading_layer": numba.threading_layer(),
                    "torch_threads": torch.get_num_threads(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "versions": {"numba": numba.__version__, "numpy": np.__version__,
                     "torch": torch.__version__, "python": platform.python_version()},
        "ball_size": BALL_SIZE, "dim": 3, "dtype": "float32", "repeats": args.repeats,
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tree_cpu.json").write_text(json.dumps(record, indent=2) + "\n")
    machine = record["machine"]
    lines = [
        f"# CPU ball tree build ({record['date']})",
        "",
        run_line(record),
        "",
        f"{machine['cpu']}, {machine['cores']} cores, Numba {numba.__version__} "
        f"({machine['numba_threads']} threads, {machine['numba_threading_layer']}), "
        f"torch {torch.__version__}. Uniform 3-D float32 points, ball_size {BALL_SIZE}, "
        f"median of interleaved rounds, JIT warm. Load average before / after: "
        f"{load_before[0]:.1f} / {machine['load_average_after'][0]:.1f}.",
        "",
        "| batch | numba builder ms | numba builder, 1 thread ms | build_tree ms "
        "| build_tree + 1 rotation ms | erwin ms | numba / erwin | goal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ms = row["milliseconds"]
        goal = f"<= {row['goal_ratio']:.1f}" if row["goal_ratio"] else ""
        lines.append(
            f"| {row['case']} | {ms['numba builder']:.1f} | {ms['numba builder, 1 thread']:.1f} | "
            f"{ms['build_tree']:.1f} | "
            f"{ms['build_tree, 1 rotation']:.1f} | {ms['erwin']:.1f} | "
            f"{row['ratio_numba_over_erwin']:.2f} | {goal} |")
    lines += [
        "",
        "erwin pads every cloud to the next power of two and stops at leaves of two points; "
        "sparseball pads to a multiple of ball_size and orders every level down to single "
        "slots, with ties broken by input index. build_tree adds the argument checks and tensor "
        "wrapping of sparseball/tree/__init__.py (torch ops) to the builder.",
    ]
    (args.out / "tree_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
