"""Triton backend on the GPU: each op against its floor or its nearest dense equivalent.

H=8, D=64, bfloat16 unless told otherwise; times are medians of `triton.testing.do_bench`.

- ball_attention with sigma (ball 128): one 1,048,576-point cloud, 16 clouds x 4096, and
  D = 16, 32; and one 1,000,000-point cloud, whose 64 padding slots (of 1,000,064) make the
  kernels load and apply the mask (the clouds above fill their slots: no mask).
  Forward and forward+backward against the memory floor (the bytes of the tensors
  the op must touch once, over a measured device-to-device copy bandwidth) and against
  Erwin's attention (`erwin_ball_attention`): torch SDPA on balls (slots/128, H, 128, D) with
  the distance bias as a dense float attn_mask, on Erwin's own slots: each cloud padded to
  the next power of two with duplicated points, which stay keys (the 1,000,000-point cloud
  takes 1,048,576 slots there, 1,000,064 here).
- selection_attention (top_k 16, select 64, group 64, 1M points): TFLOP/s =
  4 M top_k select H D / time, the backward counted as 2.5x the forward; for random blocks
  (no reuse between groups) and for blocks near each group (the locality of a real
  selection), against the gather floor (bytes of the selected K/V blocks read per group);
  random blocks again on a 1,000,000-point cloud (64 padding slots: masked kernels).
- compressed_attention and select_blocks at compress 64 against flash SDPA on a dense
  attention of M queries x M/64 keys (TFLOP/s by the same count).
- Peak memory of sparseball.attention forward+backward at 1M points against the bytes of
  q, k, v, out and their gradients.
- fla-core's NSA selection kernel (`fla.ops.nsa.parallel_nsa`), when importable.

Ops are timed through the Triton backend's functions (the public API adds argument checks,
one with a device sync for selection indices). Half-precision products run in the precise
mode by default (two half dots per float32
operand, exact delta; see sparseball/backends/triton/_common.py); rows marked "one-dot" time
the usual FlashAttention rounding instead.

    PYTHONPATH=. python3 bench/triton_ops.py --out out/
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
import traceback

import torch
import triton
import triton.testing

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _meta import run_line, run_record  # noqa: E402

import sparseball  # noqa: E402
from sparseball.backends.triton import _common, ops  # noqa: E402
from sparseball.tree import BallTree  # noqa: E402

BALL = 128


def ms(fn, rep: int = 200) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


@contextlib.contextmanager
def one_dot(enabled: bool):
    saved = _common.SPLIT_HALF_PRODUCTS
    _common.SPLIT_HALF_PRODUCTS = not enabled
    try:
        yield
    finally:
        _common.SPLIT_HALF_PRODUCTS = saved


def make_tree(cloud_sizes: list[int], device, generator) -> tuple[BallTree, str]:
    """A tree of uniform random points; by the Numba builder when it works, else a plain
    layout (clouds of multiples of 128 points need no padding, so the kernels see the same
    work either way)."""
    total = sum(cloud_sizes)
    pos = torch.rand(total, 3, device=device, generator=generator)
    batch = torch.repeat_interleave(torch.arange(len(cloud_sizes), device=device),
                                    torch.tensor(cloud_sizes, device=device))
    try:
        return sparseball.build_tree(pos, batch if len(cloud_sizes) > 1 else None,
                                     ball_size=BALL), "build_tree"
    except Exception as error:  # the builder is optional here
        print(f"build_tree failed ({type(error).__name__}: {error}); using a plain layout")
    assert all(n % BALL == 0 for n in cloud_sizes)
    offsets = [0]
    for n in cloud_sizes:
        offsets.append(offsets[-1] + n)
    return BallTree(
        perm=torch.arange(total, device=device),
        mask=torch.ones(total, dtype=torch.bool, device=device),
        offsets=torch.tensor(offsets, device=device),
        pos=pos,
        ball_size=BALL,
        rotation_perms=torch.empty(0, total, dtype=torch.long, device=device),
        offsets_list=tuple(offsets),
        num_points=total,
    ), "plain layout"


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = ms(lambda: y.copy_(x))
    return 2 * x.numel() / (t * 1e-3)


def inputs(tree, heads, head_dim, dtype, generator, grad=False):
    shape = (tree.num_slots, heads, head_dim)
    device = tree.device
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=generator)
               for _ in range(3))
    sigma = -torch.rand(heads, device=device, generator=generator).to(dtype)
    if grad:
        q, k, v, sigma = (t.requires_grad_() for t in (q, k, v, sigma))
    return q, k, v, sigma


def erwin_slots(pos: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, str]:
    """Erwin's slots for clouds of `sizes` points at `pos` (input order, clouds consecutive):
    the point each slot holds, and where that layout came from.

    Erwin (models/erwin.py of github.com/maxxxzdn/erwin) gathers its inputs by the `tree_idx`
    of balltree-erwin's `build_balltree`: each cloud of n points takes 2^ceil(log2 n) slots,
    every leaf of two slots holding two points or one point twice (so 2^ceil(log2 n) - n
    duplicates), and its attention masks none of them. That tree where balltree-erwin is
    importable; else the same count per cloud in input order, the duplicated points at the
    cloud's end: the same shapes, hence the same work for the attention."""
    for n in sizes:
        assert (1 << (n - 1).bit_length()) % BALL == 0, "a cloud smaller than a ball"
    try:
        from balltree import build_balltree
    except Exception as error:  # an optional peer (bench/fetch_peers.sh)
        how = f"emulated (balltree-erwin not importable: {type(error).__name__})"
    else:
        batch = torch.repeat_interleave(torch.arange(len(sizes), device=pos.device),
                                        torch.tensor(sizes, device=pos.device))
        tree_idx, _ = build_balltree(pos, batch)
        return tree_idx.to(pos.device), "balltree-erwin"
    parts, start = [], 0
    for n in sizes:
        slots = 1 << (n - 1).bit_length()
        pairs = n - slots // 2  # leaves of two points; the slots // 2 - pairs others hold one
        parts += [torch.arange(start, start + 2 * pairs),
                  torch.arange(start + 2 * pairs, start + n).repeat_interleave(2)]
        start += n
    return torch.cat(parts).to(pos.device), how


def erwin_ball_attention(q, k, v, pos, sigma):
    """Erwin's BallMSA attention (models/erwin.py): SDPA on (slots/128, H, 128, D) balls with
    `sigma * cdist` of the ball's positions as a dense float attn_mask, formed on every call
    as Erwin's forward does (the product in float32, as Erwin's float32 parameter makes it;
    cast to the inputs' dtype at SDPA, as autocast would). No slot is masked: Erwin's padding
    duplicates points, and they attend and are attended to. No host sync."""
    M, H, D = q.shape
    balls = M // BALL

    def to_balls(x):
        return x.view(balls, BALL, H, D).transpose(1, 2)

    p = pos.view(balls, BALL, -1)
    bias = sigma.float().view(1, H, 1, 1) * torch.cdist(p, p).unsqueeze(1)
    out = torch.nn.functional.scaled_dot_product_attention(to_balls(q), to_balls(k), to_balls(v),
                                                           attn_mask=bias.to(q.dtype))
    return out.transpose(1, 2).reshape(M, H, D)


def erwin_inputs(tree: BallTree, sizes: list[int], tensors):
    """q, k, v (slot tensors of `tree`) and the positions on Erwin's slots (`erwin_slots`),
    gathered point by point as Erwin's forward gathers `x[tree_idx]`; q, k, v as new leaves.
    Returns them, the slot count and the layout's origin."""
    pos = tree.from_slots(tree.pos)
    index, how = erwin_slots(pos, sizes)
    gathered = [tree.from_slots(t.detach())[index].requires_grad_() for t in tensors]
    return (*gathered, pos[index], index.numel(), how)


def bench_ball(results, bandwidth, device, generator, dtype, heads):
    cases = [("1 x 1,048,576", [1 << 20], 64), ("16 x 4,096", [4096] * 16, 64),
             ("1 x 1,048,576", [1 << 20], 32), ("1 x 1,048,576", [1 << 20], 16),
             ("1 x 1,000,000 (padded)", [1_000_000], 64)]
    for name, sizes, head_dim in cases:
        row = ball_case(name, sizes, head_dim, bandwidth, device, generator, dtype, heads)
        print("ball_attention", row, flush=True)
        results["ball_attention"].append(row)
        torch.cuda.empty_cache()


def ball_case(name, sizes, head_dim, bandwidth, device, generator, dtype, heads) -> dict:
    tree, layout = make_tree(sizes, device, generator)
    q, k, v, sigma = inputs(tree, heads, head_dim, dtype, generator, grad=True)
    grad_out = torch.randn_like(q)
    M = tree.num_slots
    elem = q.element_size()
    pos_bytes = tree.pos.numel() * tree.pos.element_size() + M  # positions and mask
    fwd_bytes = 4 * M * heads * head_dim * elem + pos_bytes  # q, k, v, out
    bwd_bytes = fwd_bytes + 4 * M * heads * head_dim * elem  # + dout, dq, dk, dv
    row = {"clouds": name, "head_dim": head_dim, "layout": layout}

    def fwd():
        return ops.ball_attention(q, k, v, tree, BALL, sigma, head_dim**-0.5)

    q_e, k_e, v_e, pos_e, erwin_slot_count, erwin_layout = erwin_inputs(tree, sizes, (q, k, v))
    grad_e = torch.randn_like(q_e)
    duplicates = erwin_slot_count - tree.num_points
    row["erwin"] = (f"{erwin_slot_count:,} slots ({duplicates:,} duplicates), no mask; "
                    f"layout {erwin_layout}")

    def erwin():
        return erwin_ball_attention(q_e, k_e, v_e, pos_e, sigma)

    def fwd_bwd(run=fwd):
        torch.autograd.grad(run(), (q, k, v, sigma), grad_out)

    def erwin_fwd_bwd():
        torch.autograd.grad(erwin(), (q_e, k_e, v_e, sigma), grad_e)

    with torch.no_grad():
        row["fwd_ms"] = ms(fwd)
    row["fwd_bwd_ms"] = ms(fwd_bwd)
    with one_dot(True):
        with torch.no_grad():
            row["fwd_ms_one_dot"] = ms(fwd)
        row["fwd_bwd_ms_one_dot"] = ms(fwd_bwd)
    row["floor_fwd_ms"] = fwd_bytes / bandwidth * 1e3
    row["floor_fwd_bwd_ms"] = (fwd_bytes + bwd_bytes) / bandwidth * 1e3
    row["fwd_of_floor"] = row["floor_fwd_ms"] / row["fwd_ms"]
    row["fwd_bwd_of_floor"] = row["floor_fwd_bwd_ms"] / row["fwd_bwd_ms"]
    try:
        with torch.no_grad():
            row["erwin_fwd_ms"] = ms(erwin)
        row["erwin_fwd_bwd_ms"] = ms(erwin_fwd_bwd)
        row["speedup_fwd_vs_erwin"] = row["erwin_fwd_ms"] / row["fwd_ms"]
        row["speedup_fwd_bwd_vs_erwin"] = row["erwin_fwd_bwd_ms"] / row["fwd_bwd_ms"]
    except torch.OutOfMemoryError:
        row["erwin"] += "; out of memory"
    return row


def random_selection(tree, heads, top_k, select_size, group_size, generator):
    """Distinct blocks of the group's cloud per (group, head): shift + (base + i * odd stride
    mod n), n the largest power of two up to the cloud's block count (so the blocks are
    distinct), shift a random offset that keeps them in the cloud."""
    device = tree.device
    groups = tree.num_slots // group_size
    blocks = tree.offsets_list[1] // select_size  # one cloud
    blocks_per_cloud = 1 << (blocks.bit_length() - 1)
    base = torch.randint(0, blocks_per_cloud, (groups, heads, 1), device=device,
                         generator=generator)
    stride = 2 * torch.randint(0, blocks_per_cloud // 2, (groups, heads, 1), device=device,
                               generator=generator) + 1
    shift = torch.randint(0, blocks - blocks_per_cloud + 1, (groups, heads, 1), device=device,
                          generator=generator)
    steps = torch.arange(top_k, device=device)
    chosen = shift + (base + steps * stride) % blocks_per_cloud
    return chosen.sort(-1).values.to(torch.int32)


def nearby_selection(tree, heads, top_k, select_size, group_size, generator, window=64):
    """Distinct blocks drawn from the `window` blocks around each group (one cloud): the
    locality a real selection has (neighbouring groups choose overlapping blocks), which lets
    L2 serve repeated key blocks."""
    device = tree.device
    groups = tree.num_slots // group_size
    blocks = tree.offsets_list[1] // select_size
    centre = torch.arange(groups, device=device) * group_size // select_size
    start = (centre - window // 2).clamp(0, blocks - window)
    picks = torch.rand(groups, heads, window, device=device, generator=generator).argsort(-1)
    return (start.view(-1, 1, 1) + picks[..., :top_k]).sort(-1).values.to(torch.int32)


def bench_selection(results, bandwidth, device, generator, dtype, heads, head_dim):
    for points in (1 << 20, 1_000_000):
        selection_case(results, bandwidth, device, generator, dtype, heads, head_dim, points)
        torch.cuda.empty_cache()


def selection_case(results, bandwidth, device, generator, dtype, heads, head_dim, points):
    """One cloud of `points` points; a padded cloud only for random blocks in the precise
    mode: the mask's cost, not another selection's."""
    top_k, select_size, group_size = 16, 64, 64
    tree, layout = make_tree([points], device, generator)
    padded = tree.num_points < tree.num_slots
    q, k, v, sigma = inputs(tree, heads, head_dim, dtype, generator, grad=True)
    grad_out = torch.randn_like(q)
    M = tree.num_slots
    flops = 4 * M * top_k * select_size * heads * head_dim
    # The gather floor: every (group, head) reads its top_k blocks of K and V (forward and dq)
    # and the dk/dv pass reads Q and dO once per selection; plus the dense [M, H, D] tensors.
    elem, dense = q.element_size(), M * heads * head_dim * q.element_size()
    gathered = (M // group_size) * heads * top_k * select_size * head_dim * elem
    floor_fwd_ms = (2 * gathered + 2 * dense) / bandwidth * 1e3
    floor_bwd_ms = (4 * gathered + 5 * dense) / bandwidth * 1e3
    selections = {
        "random": random_selection(tree, heads, top_k, select_size, group_size, generator),
    }
    if not padded:
        selections["nearby"] = nearby_selection(tree, heads, top_k, select_size, group_size,
                                                generator)
    for selection, indices in selections.items():
        def fwd(indices=indices):
            return ops.selection_attention(q, k, v, tree, indices, select_size, group_size, sigma,
                                           head_dim**-0.5)

        def fwd_bwd(fwd=fwd):
            torch.autograd.grad(fwd(), (q, k, v, sigma), grad_out)

        for mode in (False,) if padded else (False, True):
            with one_dot(mode):
                with torch.no_grad():
                    t_fwd = ms(fwd)
                t_all = ms(fwd_bwd)
            row = {"points": f"{points:,}", "selection": selection,
                   "mode": "one-dot" if mode else "precise",
                   "layout": layout, "fwd_ms": t_fwd, "fwd_bwd_ms": t_all,
                   "fwd_tflops": flops / t_fwd * 1e-9, "fwd_bwd_tflops": 3.5 * flops / t_all * 1e-9,
                   "gather_floor_fwd_ms": floor_fwd_ms,
                   "gather_floor_fwd_bwd_ms": floor_fwd_ms + floor_bwd_ms}
            print("selection_attention", row, flush=True)
            results["selection_attention"].append(row)


def bench_compressed(results, device, generator, dtype, heads, head_dim):
    c, s, g, top_k = 64, 64, 64, 16
    tree, layout = make_tree([1 << 20], device, generator)
    q, k, v, sigma = inputs(tree, heads, head_dim, dtype, generator, grad=True)
    M = tree.num_slots
    scale = head_dim**-0.5
    k_cmp = ops.compress(k.detach(), tree, c).requires_grad_()
    v_cmp = ops.compress(v.detach(), tree, c).requires_grad_()
    grad_out = torch.randn_like(q)
    flops = 4 * M * (M // c) * heads * head_dim

    def fwd():
        return ops.compressed_attention(q, k_cmp, v_cmp, tree, c, sigma, scale)

    def fwd_bwd():
        out, _ = fwd()
        torch.autograd.grad(out, (q, k_cmp, v_cmp, sigma), grad_out)

    with torch.no_grad():
        _, lse = fwd()
    for mode in (False, True):
        with one_dot(mode):
            with torch.no_grad():
                t_fwd = ms(fwd)
            t_all = ms(fwd_bwd)
        row = {"op": "compressed_attention", "mode": "one-dot" if mode else "precise",
               "layout": layout, "fwd_ms": t_fwd, "fwd_bwd_ms": t_all,
               "fwd_tflops": flops / t_fwd * 1e-9, "fwd_bwd_tflops": 3.5 * flops / t_all * 1e-9}
        print("compressed", row, flush=True)
        results["compressed"].append(row)
    with torch.no_grad():
        t_sel = ms(lambda: ops.select_blocks(q, k_cmp, lse, tree, c, s, g, top_k, sigma, scale,
                                             None))
    # select_blocks forms Q K^T once: half the flops of attention's forward.
    row = {"op": "select_blocks", "fwd_ms": t_sel, "fwd_tflops": flops / 2 / t_sel * 1e-9}
    print("compressed", row, flush=True)
    results["compressed"].append(row)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    qd = torch.randn(1, heads, M, head_dim, device=device, dtype=dtype, requires_grad=True)
    kd = torch.randn(1, heads, M // c, head_dim, device=device, dtype=dtype, requires_grad=True)
    vd = torch.randn_like(kd, requires_grad=True)
    gd = torch.randn_like(qd)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        def dense():
            return torch.nn.functional.scaled_dot_product_attention(qd, kd, vd)
        with torch.no_grad():
            t_fwd = ms(dense)
        t_all = ms(lambda: torch.autograd.grad(dense(), (qd, kd, vd), gd))
    flash = {"op": "flash SDPA, M x M/64 dense", "fwd_ms": t_fwd, "fwd_bwd_ms": t_all,
             "fwd_tflops": flops / t_fwd * 1e-9, "fwd_bwd_tflops": 3.5 * flops / t_all * 1e-9}
    print("compressed", flash, flush=True)
    results["compressed"].append(flash)
    # The goal's measure: both forward ops together (1.5x attention's flops: select_blocks
    # forms Q K^T once more) against flash SDPA's rate on the dense problem.
    precise = results["compressed"][0]
    both = {"op": "compressed_attention + select_blocks", "mode": precise["mode"],
            "fwd_ms": precise["fwd_ms"] + t_sel,
            "fwd_tflops": 1.5 * flops / (precise["fwd_ms"] + t_sel) * 1e-9}
    both["of_flash_fwd"] = both["fwd_tflops"] / flash["fwd_tflops"]
    print("compressed", both, flush=True)
    results["compressed"].append(both)


def bench_memory(results, device, generator, dtype, heads, head_dim):
    tree, layout = make_tree([1 << 20], device, generator)
    q, k, v, sigma = inputs(tree, heads, head_dim, dtype, generator, grad=True)
    grad_out = torch.randn_like(q)
    tensor_bytes = q.numel() * q.element_size()

    def step():
        out = sparseball.attention(q, k, v, tree, sigma=sigma, backend="triton")
        torch.autograd.grad(out, (q, k, v, sigma), grad_out)

    step()  # compile kernels, warm the allocator
    torch.cuda.synchronize()
    inputs_bytes = torch.cuda.memory_allocated()  # q, k, v, sigma, dout, the tree
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    # What any implementation must hold at the end: q, k, v, out, dq, dk, dv (and dout).
    floor = 7 * tensor_bytes
    row = {"layout": layout, "peak_gib": peak / 2**30, "qkv_out_grads_gib": floor / 2**30,
           "peak_over_qkv_out_grads": peak / floor,
           "peak_above_inputs_gib": (peak - inputs_bytes) / 2**30}
    print("memory", row, flush=True)
    results["memory"].append(row)


def bench_fla(results, device, generator, dtype, head_dim):
    try:
        from fla.ops.nsa import parallel_nsa
    except Exception as error:  # an optional peer
        results["fla_nsa"].append({"skipped": f"fla not importable: {error}"})
        return
    T, HQ, top_k, block = 1 << 19, 16, 16, 64  # fla wants >= 16 query heads per KV head
    q = torch.randn(1, T, HQ, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, T, 1, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    # Causal: each token picks 16 distinct blocks at or before its own (all 16 once it can).
    current = torch.arange(T, device=device) // block
    picks = torch.randint(0, 1 << 30, (T, top_k), device=device, generator=generator)
    indices = (picks % (current[:, None] + 1)).sort(-1).values
    indices = indices.view(1, T, 1, top_k)
    grad_out = torch.randn_like(q)
    flops = 4 * T * top_k * block * HQ * head_dim
    try:
        def fwd():
            return parallel_nsa(q, k, v, block_indices=indices, block_counts=top_k,
                                block_size=block)
        with torch.no_grad():
            t_fwd = ms(fwd)
        t_all = ms(lambda: torch.autograd.grad(fwd(), (q, k, v), grad_out))
        row = {"tokens": T, "query_heads": HQ, "fwd_ms": t_fwd, "fwd_bwd_ms": t_all,
               "fwd_tflops": flops / t_fwd * 1e-9, "fwd_bwd_tflops": 3.5 * flops / t_all * 1e-9,
               "note": "selection branch only; repeated block ids, causal"}
    except Exception as error:  # report what the peer said
        row = {"skipped": f"{type(error).__name__}: {error}"}
    print("fla_nsa", row, flush=True)
    results["fla_nsa"].append(row)


def markdown(results) -> str:
    lines = [f"# sparseball Triton backend ({results['gpu']}, {results['date']})", "",
             run_line(results), "",
             f"torch {results['torch']}, triton {results['triton']}, H={results['heads']}, "
             f"{results['dtype']}; copy bandwidth {results['copy_bandwidth_gbs']:.0f} GB/s", ""]

    def table(title, rows, keys):
        if not rows:
            return
        lines.extend([f"## {title}", "", "| " + " | ".join(keys) + " |",
                      "|" + "---|" * len(keys)])
        for row in rows:
            cells = []
            for key in keys:
                value = row.get(key, "")
                cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    table("ball_attention (ball 128, sigma)", results["ball_attention"],
          ["clouds", "head_dim", "fwd_ms", "fwd_bwd_ms", "fwd_ms_one_dot", "fwd_bwd_ms_one_dot",
           "floor_fwd_ms", "floor_fwd_bwd_ms", "fwd_of_floor", "fwd_bwd_of_floor",
           "erwin_fwd_ms", "erwin_fwd_bwd_ms", "speedup_fwd_vs_erwin", "speedup_fwd_bwd_vs_erwin",
           "erwin"])
    table("selection_attention (one cloud, top_k 16, select 64, group 64)",
          results["selection_attention"],
          ["points", "selection", "mode", "fwd_ms", "fwd_bwd_ms", "fwd_tflops", "fwd_bwd_tflops",
           "gather_floor_fwd_ms", "gather_floor_fwd_bwd_ms"])
    table("compressed attention and select_blocks (compress 64) vs flash SDPA",
          results["compressed"], ["op", "mode", "fwd_ms", "fwd_bwd_ms", "fwd_tflops",
                                  "fwd_bwd_tflops", "of_flash_fwd"])
    table("sparseball.attention fwd+bwd peak memory (1M points)", results["memory"],
          ["peak_gib", "qkv_out_grads_gib", "peak_over_qkv_out_grads", "peak_above_inputs_gib"])
    table("fla-core NSA selection (parallel_nsa)", results["fla_nsa"],
          ["tokens", "query_heads", "fwd_ms", "fwd_bwd_ms", "fwd_tflops", "fwd_bwd_tflops",
           "note", "skipped"])
    if results["errors"]:
        lines.extend(["## errors", ""] + [f"- {e}" for e in results["errors"]])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--only", nargs="*", default=None,
                        help="ball, selection, compressed, memory, fla")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out"))
    parser.add_argument("--config", type=json.loads, default={},
                        help='launch overrides, e.g. \'{"select_blocks": {"heads_inside": true}}\' '
                             "(what bench/triton_tune.py sweeps), recorded in the results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/triton_ops.py needs a CUDA device")
    _common.CONFIG_OVERRIDES.update(args.config)
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    results = {
        **run_record(),
        "heads": args.heads,
        "dtype": args.dtype, "config_overrides": args.config, "ball_attention": [], "selection_attention": [],
        "compressed": [], "memory": [], "fla_nsa": [], "errors": [],
    }
    results["copy_bandwidth_gbs"] = copy_bandwidth(device) / 1e9
    bandwidth = results["copy_bandwidth_gbs"] * 1e9
    parts = {
        "ball": lambda: bench_ball(results, bandwidth, device, generator, dtype, args.heads),
        "selection": lambda: bench_selection(results, bandwidth, device, generator, dtype, args.heads,
                                             args.head_dim),
        "fla": lambda: bench_fla(results, device, generator, dtype, args.head_dim),
        "compressed": lambda: bench_compressed(results, device, generator, dtype, args.heads,
                                               args.head_dim),
        "memory": lambda: bench_memory(results, device, generator, dtype, args.heads,
                                       args.head_dim),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, run in parts.items():
        if args.only and name not in args.only:
            continue
        try:
            run()
        except Exception as error:  # keep the other parts' numbers
            traceback.print_exc()
            results["errors"].append(f"{name}: {type(error).__name__}: {error}")
        torch.cuda.empty_cache()
        # After every part, so a run cut short keeps what it measured.
        (args.out / "triton_ops.json").write_text(json.dumps(results, indent=2))
        (args.out / "triton_ops.md").write_text(markdown(results))
    print(markdown(results))
    if results["errors"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
