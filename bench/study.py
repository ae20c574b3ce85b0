"""The learning study: ErwinNSA (`nsa`) against its baselines (`ball`: local ball attention
only; `full`: exact attention inside each cloud) on gravity, with equal budgets.

    PYTHONPATH=. python3 bench/study.py --out /tmp/results            # on a GPU
    PYTHONPATH=. python3 bench/study.py --steps 20 --clouds 2 --points 256 --tasks pure \
        --device cpu --out /tmp/study                                   # a smoke run

Every model trains through `sparseball.training.train` with the same config except `--model`:
same steps, same data stream (seed), same optimizer and schedule, parameters within 10%. The
test error is `sparseball.training.evaluate_run` on fresh held-out batches (seeds never used
in training): the mean over clouds of the relative L2 error of the acceleration. Tasks: pure
Newtonian gravity, and Yukawa-screened gravity with a short (0.05) and a medium (0.2)
screening length (the unit cube holds each cloud; the short one makes the interaction local).

Writes study_<gpu>.json, .md and .png (test error curves per task) under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import textwrap
from pathlib import Path

from _meta import run_line, run_record

from sparseball.models import ATTENTIONS
from sparseball.training import Config, evaluate_run, train
from sparseball.training.metrics import read_log

TASKS = {"pure": None, "medium": 0.2, "short": 0.05}
# The studied models: ErwinNSA's attention kinds, and NSA with the tree far field (its level-0
# blocks are both compressed and selected: 64, the flat model's selected size).
MODELS = {**{name: {"model": name} for name in ATTENTIONS},
          "nsa-tree": {"model": "nsa", "far_field": "tree", "compress_size": 64,
                       "select_size": 64}}


def run_one(base: Config, model: str, task: str, out: Path, test_batches: int) -> dict:
    cfg = dataclasses.replace(base, **MODELS[model], screening=TASKS[task],
                              out=str(out / f"{task}-{model}-{base.clouds}x{base.points}"))
    result = train(cfg, progress=False, plot=False)
    report = evaluate_run(cfg.out, batches=test_batches, progress=False)
    rows = read_log(Path(cfg.out))
    times = sorted(r["step_time_s"] for r in rows if "step_time_s" in r)
    return {
        "task": task, "screening": TASKS[task], "model": model, "clouds": base.clouds,
        "points": base.points, "steps": base.steps, "seed": base.seed,
        "parameters": sum(p.numel() for p in result.model.parameters()),
        "test_rel_l2": report["rel_l2"], "test_mse": report["mse"],
        "step_ms": 1e3 * times[len(times) // 2] if times else None,
        "peak_memory_mb": max((r.get("peak_memory_mb", 0) for r in rows), default=None),
        "curve": [(r["step"], r["eval_rel_l2"]) for r in rows if "eval_rel_l2" in r],
        "run": cfg.out,
    }


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure")
        return
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for r in rows:
            if r["task"] == task:
                steps, errors = zip(*r["curve"], strict=True)
                ax.plot(steps, errors, label=f"{r['model']} (test {r['test_rel_l2']:.3f})")
        ax.set_title(f"gravity, {task}" + (f" (screening {TASKS[task]})" if TASKS[task] else ""))
        ax.set_xlabel("step")
        ax.set_ylabel("validation rel. L2 error")
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle("\n".join(textwrap.wrap(title, 70 * len(tasks))), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", choices=list(MODELS), default=list(ATTENTIONS))
    parser.add_argument("--tasks", nargs="*", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--clouds", type=int, default=16)
    parser.add_argument("--points", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-batches", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--runs", type=Path, default=None,
                        help="where the run directories go (default: OUT/study-runs)")
    args = parser.parse_args()
    base = Config(task="gravity", clouds=args.clouds, points=args.points, steps=args.steps,
                  seed=args.seed, device=args.device, precision=args.precision,
                  dim=128, depth=4, heads=8, ball_size=128, compress_size=32, select_size=64,
                  group_size=64, top_k=8, lr=1e-3, eval_every=max(1, args.steps // 10),
                  save_every=0)
    runs = args.runs or args.out / "study-runs"
    meta = {**run_record(), "config": {k: v for k, v in dataclasses.asdict(base).items()
                                       if k not in ("model", "screening", "out")}}
    rows = []
    for task in args.tasks:
        for model in args.models:
            rows.append(run_one(base, model, task, runs, args.test_batches))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
            write(rows, meta, args)  # after every run: a cut-off study keeps what it finished


def write(rows: list[dict], meta: dict, args: argparse.Namespace) -> None:
    device = meta["gpu"] or "cpu"
    stem = f"study_{device.split()[-1].lower()}_{args.clouds}x{args.points}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    title = (f"{run_line(meta)}: {args.clouds} x {args.points} points, {args.steps} steps, "
             f"seed {args.seed}")
    plot(rows, args.out / f"{stem}.png", title)
    lines = [f"# Gravity study ({title})", "",
             "| task | model | params | test rel. L2 | step ms | peak MB |", "|---|---|---|---|---|---|"]
    for r in rows:
        step = f"{r['step_ms']:.1f}" if r["step_ms"] else ""
        lines.append(f"| {r['task']} | {r['model']} | {r['parameters']:,} | "
                     f"{r['test_rel_l2']:.4f} | {step} | {r['peak_memory_mb'] or 0:.0f} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
