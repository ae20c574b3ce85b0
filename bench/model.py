"""One training step of `ErwinNSA` and its baselines on a GPU: forward + backward + AdamW,
bf16 autocast, the tree built inside `forward` (included in the time), peak memory.

    PYTHONPATH=. python3 bench/model.py --out /tmp/results          # every row
    PYTHONPATH=. python3 bench/model.py --only nsa --sizes 16x4096  # some rows

Rows: model (nsa, ball, full) x size (16 x 4096, 1 x 65,536, 1 x 1,048,576 points). Inputs are
random points in the unit cube with one feature (as the gravity task's masses); data
generation is not timed. Eager by default; `--compile` adds torch.compile rows for 16 x 4096.
The 1M-point rows use activation checkpointing (one block's activations at a time).
Writes model_<gpu>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _meta import run_line, run_record

from sparseball.models import ATTENTIONS, ErwinNSA

SIZES = {"16x4096": (16, 4096), "1x65536": (1, 65536), "1x1048576": (1, 1 << 20)}



def batch_of(clouds: int, points: int, device) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(device=device).manual_seed(0)
    n = clouds * points
    pos = torch.rand(n, 3, device=device, generator=generator)
    x = torch.rand(n, 1, device=device, generator=generator)
    batch = torch.arange(clouds, device=device).repeat_interleave(points)
    y = torch.randn(n, 3, device=device, generator=generator)
    return x, pos, batch, y


def training_step(attention: str, clouds: int, points: int, *, compiled: bool = False,
                  checkpoint: bool = False):
    """The default model of `attention`, its optimizer, and a closure running one training
    step (forward, backward, AdamW) on a fixed random batch."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = ErwinNSA(1, 3, attention=attention, checkpoint=checkpoint).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step_model = torch.compile(model) if compiled else model
    x, pos, batch, y = batch_of(clouds, points, device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (step_model(x, pos, batch) - y).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def measure(attention: str, clouds: int, points: int, compiled: bool, steps: int) -> dict:
    large = clouds * points > 100_000
    model, step = training_step(attention, clouds, points, compiled=compiled, checkpoint=large)
    step()  # build and compile the kernels (and the graph)
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {
        "model": attention, "clouds": clouds, "points": points, "compiled": compiled,
        "checkpoint": large, "parameters": sum(p.numel() for p in model.parameters()),
        "step_ms_median": times[len(times) // 2], "step_ms_min": times[0],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def profile(attention: str, clouds: int, points: int, out: Path) -> None:
    """torch.profiler table of one eager step (after two warm-up steps): where the time goes."""
    _, step = training_step(attention, clouds, points)
    step()
    step()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                        "cuLaunchKernelEx"))
    summary = (f"{attention} {clouds} x {points}: {launches} kernel launches, CUDA time "
               f"{sum(e.self_device_time_total for e in events) / 1e3:.1f} ms, CPU time "
               f"{sum(e.self_cpu_time_total for e in events) / 1e3:.1f} ms")
    print(summary)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"model_profile_{attention}_{clouds}x{points}.txt").write_text(summary + "\n" + table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=ATTENTIONS, default=list(ATTENTIONS))
    parser.add_argument("--sizes", nargs="*", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--compile", action="store_true", help="also torch.compile at 16x4096")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--profile", action="store_true",
                        help="only a torch.profiler table of one eager step per model and size")
    args = parser.parse_args()
    if args.profile:
        for size in args.sizes:
            for attention in args.only:
                profile(attention, *SIZES[size], args.out)
        return
    rows = []
    for size in args.sizes:
        clouds, points = SIZES[size]
        for attention in args.only:
            if attention == "full" and clouds * points > 100_000:
                continue  # quadratic: 1M points of exact attention is the case NSA exists for
            for compiled in (False, True) if args.compile and size == "16x4096" else (False,):
                try:
                    row = measure(attention, clouds, points, compiled, args.steps)
                except torch.cuda.OutOfMemoryError as error:
                    row = {"model": attention, "clouds": clouds, "points": points,
                           "compiled": compiled, "error": f"out of memory: {error}"[:200]}
                torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = run_record()
    gpu = meta["gpu"]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "model_" + gpu.split()[-1].lower()
    (args.out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    lines = ["# ErwinNSA training step", "", run_line(meta), "",
             "bf16 autocast, AdamW, tree built in forward; median of the steps.", "",
             "| model | clouds x points | compiled | params | step ms | peak GiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['clouds']} x {r['points']} | {r['compiled']} | | "
                         f"{r['error'][:40]} | |")
            continue
        lines.append(f"| {r['model']} | {r['clouds']} x {r['points']} | {r['compiled']} | "
                     f"{r['parameters']:,} | {r['step_ms_median']:.1f} | {r['peak_gib']:.2f} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
