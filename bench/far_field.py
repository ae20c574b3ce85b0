"""The tree far field against flat NSA: `sparseball.attention(far_field="tree")` and
`far_field="flat"` on one cloud of N points, forward and forward+backward, with peak memory.

N = 65,536 ... 16,777,216 points uniform in the unit cube, bfloat16, H=8, D=64, balls of 128,
compress = select = group = 64, top_k 16, fanout 4, top_blocks 256, with sigma; backend triton.
Flat NSA costs O(N^2 / c) (every query scores every compressed block of its cloud): it runs
while its forward+backward, extrapolated quadratically from the last size it ran, stays under
--flat-limit seconds and it fits in memory. Times are medians over repeats after one warm-up
call (which also builds the kernels); peak memory is that of one forward+backward above what
the inputs hold. The level layout (`tree.levels`) is built before timing, as a model builds it
once per tree.

Writes far_field_<gpu>.json, .md and a log-log figure .png (time vs N, an N log N guide
through the first tree point) into --out (bench/results by default). On a machine without a
GPU, `--quick --backend torch` runs the same code on a few thousand points (a smoke test).

    PYTHONPATH=. python3 bench/far_field.py --out out/
    PYTHONPATH=. python3 bench/far_field.py --quick --backend torch --out /tmp/ff
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _meta import run_line, run_record  # noqa: E402

import sparseball  # noqa: E402
from sparseball.tree import BallTree  # noqa: E402

BALL = 128
SIZES = [1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24]
QUICK_SIZES = [2048, 8192]
PARAMS = dict(compress_size=64, select_size=64, group_size=64, top_k=16)
TREE = dict(fanout=4, top_blocks=256)


def make_tree(n: int, device, generator) -> tuple[BallTree, str]:
    """One cloud of n uniform random points: `build_tree` when it works, else a plain layout
    (n is a multiple of the ball: no padding, so the kernels see the same work)."""
    pos = torch.rand(n, 3, device=device, generator=generator)
    try:
        return sparseball.build_tree(pos, ball_size=BALL), "build_tree"
    except Exception as error:  # the builder is optional here
        print(f"build_tree failed ({type(error).__name__}: {error}); using a plain layout")
    assert n % BALL == 0
    return BallTree(
        perm=torch.arange(n, device=device), mask=torch.ones(n, dtype=torch.bool, device=device),
        offsets=torch.tensor([0, n], device=device), pos=pos, ball_size=BALL,
        rotation_perms=torch.empty(0, n, dtype=torch.long, device=device), offsets_list=(0, n),
        num_points=n,
    ), "plain layout"


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device, budget: float = 2.0, most: int = 20) -> float:
    """Median wall time of `fn()` after one warm-up call: repeats until `budget` seconds or
    `most` calls (at least 3)."""
    fn()
    sync(device)
    times = []
    while len(times) < 3 or (sum(times) < budget and len(times) < most):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(fn, device) -> int | None:
    """Peak memory allocated by one `fn()` above what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def case(n: int, far_field: str, args, device, dtype, generator) -> dict:
    tree, layout = make_tree(n, device, generator)
    H, D = args.heads, args.head_dim
    q, k, v, grad = (torch.randn(tree.num_slots, H, D, device=device, generator=generator)
                     .to(dtype) for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    sigma = (-torch.rand(H, device=device, generator=generator)).requires_grad_()
    extra = dict(far_field=far_field, **TREE) if far_field == "tree" else {}
    record = dict(n=n, far_field=far_field, slots=tree.num_slots, layout=layout)
    if far_field == "tree":
        levels = tree.levels(PARAMS["compress_size"], **TREE)  # once per tree, not timed
        record.update(levels=levels.top_level + 1, tokens=levels.num_tokens,
                      max_cut=levels.max_cut(PARAMS["top_k"]))

    def forward():
        return sparseball.attention(q, k, v, tree, sigma=sigma, backend=args.backend,
                                    **PARAMS, **extra)

    def forward_backward():
        out = forward()
        torch.autograd.grad(out, (q, k, v, sigma), grad)

    record["forward_ms"] = 1e3 * seconds(forward, device)
    record["forward_backward_ms"] = 1e3 * seconds(forward_backward, device)
    record["peak_bytes"] = peak_bytes(forward_backward, device)
    return record


def markdown(results: dict) -> str:
    lines = [f"# Tree far field vs flat NSA ({results['backend']})", "", run_line(results), "",
             f"One cloud, {results['dtype']}, H={results['heads']}, D={results['head_dim']}, "
             f"ball {BALL}, compress = select = group 64, top_k 16, fanout 4, top_blocks 256, "
             "sigma on. Medians; peak memory of one forward+backward above the inputs.", "",
             "| N | far field | levels | max cut | forward ms | fwd+bwd ms | peak GiB |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in results["cases"]:
        peak = "" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**30:.2f}"
        if "skipped" in r:
            lines.append(f"| {r['n']:,} | {r['far_field']} | | | {r['skipped']} | | |")
            continue
        lines.append(f"| {r['n']:,} | {r['far_field']} | {r.get('levels', '')} | "
                     f"{r.get('max_cut', '')} | {r['forward_ms']:.2f} | "
                     f"{r['forward_backward_ms']:.2f} | {peak} |")
    if results["errors"]:
        lines += ["", "Errors:", *[f"- {e}" for e in results["errors"]]]
    return "\n".join(lines) + "\n"


def figure(results: dict, path: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure")
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {"tree": "o-", "flat": "s--"}
    for far_field in ("tree", "flat"):
        for key, what in (("forward_ms", "forward"), ("forward_backward_ms", "fwd+bwd")):
            rows = [r for r in results["cases"] if r["far_field"] == far_field and key in r]
            if rows:
                ax.plot([r["n"] for r in rows], [r[key] for r in rows], styles[far_field],
                        alpha=1.0 if what == "fwd+bwd" else 0.5, label=f"{far_field} {what}")
    first = next((r for r in results["cases"] if r["far_field"] == "tree"
                  and "forward_backward_ms" in r), None)
    if first is not None:
        ns = sorted({r["n"] for r in results["cases"]})
        guide = [first["forward_backward_ms"] * n * math.log(n) / (first["n"] * math.log(first["n"]))
                 for n in ns]
        ax.plot(ns, guide, ":", color="gray", label="N log N")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("points N (one cloud)")
    ax.set_ylabel("time (ms)")
    ax.set_title(f"sparseball.attention, {results['backend']}, {results['gpu'] or 'CPU'}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def tag(record: dict) -> str:
    """A file-name tag for the device: 'h200' of 'NVIDIA H200', else 'cpu'."""
    if not record["gpu"]:
        return "cpu"
    words = re.findall(r"[A-Za-z]*\d+[A-Za-z]*", record["gpu"])
    return (words[0] if words else record["gpu"].split()[-1]).lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=None,
                        help=f"points per cloud (default {SIZES})")
    parser.add_argument("--quick", action="store_true",
                        help=f"sizes {QUICK_SIZES}: a smoke test (CPU with --backend torch)")
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--flat-limit", type=float, default=30.0,
                        help="skip flat NSA where its fwd+bwd would take longer (seconds)")
    parser.add_argument("--only", choices=["tree", "flat"], default=None)
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args()
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    results = {**run_record(), "backend": args.backend, "dtype": args.dtype, "heads": args.heads,
               "head_dim": args.head_dim, "params": {**PARAMS, **TREE, "ball_size": BALL},
               "cases": [], "errors": []}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"far_field_{tag(results)}"
    flat_last = None  # (n, seconds) of the last flat run: the quadratic extrapolation's base
    flat_stop = None
    for n in sizes:
        for far_field in ("tree", "flat"):
            if args.only and far_field != args.only:
                continue
            if far_field == "flat":
                reason = flat_stop
                if reason is None and flat_last is not None:
                    guess = flat_last[1] * (n / flat_last[0]) ** 2
                    if guess > args.flat_limit:
                        reason = f"skipped: ~{guess:.0f} s expected"
                if reason is not None:
                    results["cases"].append(dict(n=n, far_field="flat", skipped=reason))
                    continue
            try:
                record = case(n, far_field, args, device, dtype, generator)
                results["cases"].append(record)
                print(json.dumps(record))
                if far_field == "flat":
                    flat_last = (n, record["forward_backward_ms"] / 1e3)
            except torch.cuda.OutOfMemoryError:
                results["cases"].append(dict(n=n, far_field=far_field, skipped="out of memory"))
                if far_field == "flat":
                    flat_stop = "skipped: out of memory below"
            except Exception as error:  # keep the other cases' numbers
                traceback.print_exc()
                results["errors"].append(f"{far_field} N={n}: {type(error).__name__}: {error}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # After every case, so a run cut short keeps what it measured.
            (args.out / f"{name}.json").write_text(json.dumps(results, indent=2))
            (args.out / f"{name}.md").write_text(markdown(results))
    figure(results, args.out / f"{name}.png")
    print(markdown(results))
    if results["errors"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
