"""Sweep the Triton kernels' launch configurations on the GPU and report the time of each.

Each op's config function (sparseball/backends/triton/*.py) passes its choice through
`_common.launch_config`; this script puts each candidate in `_common.CONFIG_OVERRIDES`, checks
that the outputs and gradients match the default configuration's, and times forward and
forward+backward (H=8, D=64, bfloat16, sigma on; 1M points, compressed ops at 256k since they
are quadratic in the cloud). The winners go back into the config functions by hand, with the
numbers that chose them.

    PYTHONPATH=. python3 bench/triton_tune.py --out out/ [--only ball_fwd selection ...]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _meta import run_record  # noqa: E402
from triton_ops import inputs, make_tree, ms, random_selection  # noqa: E402

from sparseball.backends.triton import _common, ops  # noqa: E402

HEADS, HEAD_DIM, BALL = 8, 64, 128

# name -> candidate overrides; the first is the code's default (empty override).
# Around the defaults the 2026-11-23 H100 sweeps chose (bench/results/triton_tune_h100.json,
# then triton_tune_h100_second.json); the default's own row comes first, as the reference.
CANDIDATES = {
    # Ball 128 at D <= 64 in 16-bit: the default is one program per ball for every head
    # (heads_inside: distances formed once for all heads, a plain softmax over the ball's one
    # key tile, the head loop pipelined; 255 registers at 8 warps). On the H200 (2026-12-01,
    # bench/results/triton_tune_h200_ball_heads.json) it took the forward from 2.30 to 2.12 ms
    # and the backward from 5.91 to 5.11 ms; tiles of 64 query rows for every head measured
    # 2.31-4.0 ms. The candidates: the per-head kernels it replaced (the streamed forward with
    # 3 stages, 2.53 ms on an H100; the one-pass backward with 1 stage). Earlier sweeps of the
    # streamed forward (smaller tiles, several heads in one flat loop) are in
    # triton_tune_h200.json and triton_tune_h200_heads.json.
    # Every head in one program at 3 stages (160 KiB of shared memory; 2 stages: 112, the same
    # registers and spills in the sm_90 build) took it from 2.10 to 1.82 ms on the H200
    # (2026-12-01, triton_tune_h200_caps.json): now the default; 2 stages is the candidate, and
    # 4 (208 KiB of 227; not yet measured). Fewer registers cannot buy a second program per SM:
    # its shared memory does not fit twice, and at 128 registers ptxas spills 616 bytes.
    "ball_fwd": [{}, dict(heads_inside=False, block_m=128, block_n=64, warps=4, stages=3),
                 dict(heads_inside=True, block_m=128, warps=8, stages=2),
                 dict(heads_inside=True, block_m=128, warps=8, stages=4)],
    "ball_bwd": [{}, dict(heads_inside=False, stages=1)],
    "selection": [{}] + [
        # The one-pass dq kernel (exact delta in the same pass) holds one more accumulator:
        # its sm_90 build spills at 4 warps (272 bytes at 2 stages), barely at 8; on the H200
        # 4 warps and 2 stages stayed best all the same (69.5 ms; 8 warps 104-118 ms).
        dict(dq=(4, 1)),
        dict(dq=(4, 3)),
        dict(dq=(8, 1)),
        dict(dq=(8, 2)),
        dict(dkv=(4, 3)),
        dict(dkv=(8, 2)),
        dict(fwd=(4, 2)),
        dict(fwd=(8, 3)),
        # The forward held 208 registers on the H200 (ncu, kernel_profile_h200.txt): two
        # programs of 4 warps per SM, 45% of issue slots busy. Capped at 168 (sm_90 build: the
        # spills, 40 bytes, lie outside the loop, which gains 21 instructions), three fit:
        # 15.85 -> 14.68 ms (2026-12-01, triton_tune_h200_caps.json), now the default.
        dict(fwd=(4, 3)),
        dict(fwd=(4, 2, 168)),
        dict(fwd=(4, 4, 168)),  # not yet measured
        dict(key_rows=32, block_n=32, fwd=(4, 3), dq=(4, 2), dkv=(4, 2))],
    # The one-pass dq kernel (exact delta in the same pass as dq) holds two more accumulators;
    # its sm_90 build at the default tile spills (496 bytes), so the candidates are its tiles.
    # H200, 256k points: (64, 64, 4, 1) best, backward 47.8 ms against 55.8 ms two-pass
    # (triton_tune_h200_compressed_dq.json); now the default.
    # The forward and dk/dv were swept on an H100 (triton_tune_h100.json).
    "compressed": [{}] + [dict(dq=q) for q in (
        (64, 32, 4, 1), (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 8, 2))],
    # One program per group for all heads (the distance bias computed once, not per head; the
    # default with sigma since the heads sweep, 14.4 -> 13.4 ms), against its neighbours and
    # the per-head kernel with transposed logits (keys_as_rows; 22.5 -> 14.3 ms before).
    "select_blocks": [{}] + [dict(heads_inside=h, block_n=n, warps=w, stages=s) for h, n, w, s in (
        (False, 128, 4, 1), (True, 128, 4, 1), (True, 128, 4, 3), (True, 64, 4, 2))],
}


def problem(points: int, generator):
    tree, _ = make_tree([points], torch.device("cuda"), generator)
    q, k, v, sigma = inputs(tree, HEADS, HEAD_DIM, torch.bfloat16, generator, grad=True)
    return tree, q, k, v, sigma


def case(name: str, generator, points: int | None = None):
    """(forward function returning a tensor, the leaves it differentiates) for one sweep, on one
    cloud of `points` points: by default 2^20 (ball, selection) or 2^18 (the compressed ops),
    which fill their slots; a size that is not a multiple of 128 gives a padded cloud, whose
    kernels load the padding mask."""
    scale = HEAD_DIM**-0.5
    if name.startswith("ball"):
        tree, q, k, v, sigma = problem(points or 1 << 20, generator)
        return (lambda: ops.ball_attention(q, k, v, tree, BALL, sigma, scale)), (q, k, v, sigma)
    if name == "selection":
        tree, q, k, v, sigma = problem(points or 1 << 20, generator)
        indices = random_selection(tree, HEADS, 16, 64, 64, generator)
        return (lambda: ops.selection_attention(q, k, v, tree, indices, 64, 64, sigma, scale),
                (q, k, v, sigma))
    tree, q, k, v, sigma = problem(points or 1 << 18, generator)
    k_cmp = ops.compress(k.detach(), tree, 64).requires_grad_()
    v_cmp = ops.compress(v.detach(), tree, 64).requires_grad_()
    if name == "compressed":
        return (lambda: ops.compressed_attention(q, k_cmp, v_cmp, tree, 64, sigma, scale)[0],
                (q, k_cmp, v_cmp, sigma))
    with torch.no_grad():
        _, lse = ops.compressed_attention(q, k_cmp, v_cmp, tree, 64, sigma, scale)
    return (lambda: ops.select_blocks(q, k_cmp, lse, tree, 64, 64, 64, 16, sigma, scale, None),
            ())


def sweep(name: str, generator, points: int | None = None) -> list[dict]:
    fwd, leaves = case(name, generator, points)
    grad_out = None
    rows, reference = [], None
    for override in CANDIDATES[name]:
        _common.CONFIG_OVERRIDES[name] = override
        row = {"override": {k: list(v) if isinstance(v, tuple) else v for k, v in override.items()}}
        try:
            with torch.no_grad():
                out = fwd()
            if grad_out is None and leaves:
                grad_out = torch.randn_like(out)
            result = [out] + (list(torch.autograd.grad(fwd(), leaves, grad_out)) if leaves else [])
            if reference is None:
                reference = result
            if name == "select_blocks":
                # Near-ties may order differently; count the differing picks instead.
                row["differs"] = float((result[0] != reference[0]).float().mean())
            else:
                row["max_rel_diff"] = max(
                    float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
                    for a, b in zip(result, reference, strict=True))
            with torch.no_grad():
                row["fwd_ms"] = ms(fwd, rep=100)
            if leaves:
                row["fwd_bwd_ms"] = ms(lambda g=grad_out: torch.autograd.grad(fwd(), leaves, g), rep=100)
                row["bwd_ms"] = row["fwd_bwd_ms"] - row["fwd_ms"]
        except Exception as error:  # a config that does not compile (shared memory) or fails
            row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
        print(name, row, flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    _common.CONFIG_OVERRIDES.pop(name, None)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out"))
    parser.add_argument("--only", nargs="*", default=None, help=", ".join(CANDIDATES))
    parser.add_argument("--points", type=int, default=None,
                        help="cloud size (default 2^20, the compressed ops 2^18; e.g. 1000000 for "
                             "a padded cloud)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/triton_tune.py needs a CUDA device")
    generator = torch.Generator(device="cuda").manual_seed(0)
    record = {**run_record(), "points": args.points, "sweeps": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for name in CANDIDATES:
        if args.only and name not in args.only:
            continue
        record["sweeps"][name] = sweep(name, generator, args.points)
        (args.out / "triton_tune.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
