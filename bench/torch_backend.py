"""The torch backend at scale: `sparseball.attention` forward and backward on one cloud of
1,048,576 points (H=8, D=64), per-op times and peak GPU memory.

It shows that the pure-PyTorch fallback runs at a size where dense or per-query-gather code
runs out of memory; speed is the Triton and CuPy backends' business.

    PYTHONPATH=. python3 bench/torch_backend.py --out out/
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch
from _meta import run_line, run_record

import sparseball
from sparseball import ops


def timed(fn, repeats: int = 1) -> float:
    """Median wall time of `fn()` in milliseconds. The torch backend's calls at this size take
    seconds, so launch and allocator warm-up are noise and one run is enough."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1 << 20)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/torch_backend.py needs a CUDA device")

    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    pos = torch.rand(args.points, 3, device=device, generator=generator)
    tree = sparseball.build_tree(pos, ball_size=128)
    shape = (tree.num_slots, args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=generator)
               for _ in range(3))
    sigma = -torch.rand(args.heads, device=device, dtype=dtype, generator=generator)
    sizes = {"ball_size": 128, "compress_size": 64, "select_size": 64, "group_size": 64,
             "top_k": 16}
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sigma)]
    grad_out = torch.randn_like(q)

    def forward():
        with torch.no_grad():
            return sparseball.attention(q, k, v, tree, sigma=sigma, backend="torch", **sizes)

    def forward_backward():
        out = sparseball.attention(*leaves[:3], tree, sigma=leaves[3], backend="torch", **sizes)
        out.backward(grad_out)
        for leaf in leaves:
            leaf.grad = None

    k_cmp, v_cmp = ops.compress(k, tree, 64), ops.compress(v, tree, 64)
    _, lse = ops.compressed_attention(q, k_cmp, v_cmp, tree, 64, sigma, backend="torch")
    indices = ops.select_blocks(q, k_cmp, lse, tree, 64, 64, 64, 16, sigma, backend="torch")
    per_op = {
        "ball_attention": lambda: ops.ball_attention(q, k, v, tree, 128, sigma, backend="torch"),
        "compressed_attention": lambda: ops.compressed_attention(q, k_cmp, v_cmp, tree, 64, sigma,
                                                                 backend="torch"),
        "select_blocks": lambda: ops.select_blocks(q, k_cmp, lse, tree, 64, 64, 64, 16, sigma,
                                                   backend="torch"),
        "selection_attention": lambda: ops.selection_attention(q, k, v, tree, indices, 64, 64,
                                                               sigma, backend="torch"),
    }
    results = {name: timed(fn) for name, fn in per_op.items()}
    results["attention forward"] = timed(forward)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    results["attention forward+backward"] = timed(forward_backward)
    peak = torch.cuda.max_memory_allocated() - base
    io_bytes = 2 * 4 * q.numel() * q.element_size()  # q, k, v, out and their gradients

    record = {
        **run_record(),
        "points": args.points, "slots": tree.num_slots, "heads": args.heads,
        "head_dim": args.head_dim, "dtype": args.dtype, **sizes,
        "milliseconds": results,
        "peak_extra_memory_gib": peak / 2**30,
        "qkv_out_and_grads_gib": io_bytes / 2**30,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "torch_backend.json").write_text(json.dumps(record, indent=2))
    lines = [
        f"# torch backend at {args.points:,} points ({record['gpu']}, {record['date']})",
        "",
        run_line(record),
        "",
        f"H={args.heads}, D={args.head_dim}, {args.dtype}, ball 128, compress 64, select 64, "
        "group 64, top_k 16, sigma on.",
        "",
        "| what | ms |",
        "|---|---|",
        *(f"| {name} | {ms:.1f} |" for name, ms in results.items()),
        "",
        f"Peak GPU memory above the inputs during forward+backward: {peak / 2**30:.2f} GiB "
        f"(q, k, v, out and their gradients: {io_bytes / 2**30:.2f} GiB).",
    ]
    (args.out / "torch_backend.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
