"""Build every Triton kernel the ops launch for sm_90 (no GPU needed) and report what the
compiler made of each: shared memory, whether its key loop is software-pipelined, and counts
of divisions, square roots, exp2 and local-memory (spill) accesses in the PTX.

The ops run on small CPU tensors with `wrap_triton` replaced by a builder, so each launch
(kernel, constexprs, num_warps, num_stages) is compiled exactly as the ops configure it, in
bfloat16 and float32 at D = 64 (bfloat16 also without padding). Pointer arguments carry the
16-byte alignment the JIT specializes on a GPU: without it no tile load is wide enough for an
asynchronous copy, so the report would show nothing pipelined. tests/test_triton.py runs this with `--check`.

    python3 bench/triton_sm90.py            # a table
    python3 bench/triton_sm90.py --check    # exit 1 on too much shared memory, an
                                            # unpipelined multi-stage key loop, or a kernel
                                            # torch.compile would see storing to an input
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_LIMIT = 232448  # bytes of shared memory per block on sm_90


def build_all() -> list[dict]:
    os.environ.pop("TRITON_INTERPRET", None)  # kernels as JIT functions, built for a target
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import numpy as np
    import torch
    import triton
    from helpers import random_tree
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sparseball.backends.triton import (
        _common,
        ball,
        compressed,
        far_field,
        ops,
        select,
        selection,
    )

    types = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
             torch.uint8: "u8", torch.int64: "i64", torch.int32: "i32"}
    report, rows = [], {}  # rows: the report's row of each launch key

    class Sm90:  # the active driver for torch's kernel analysis, which asks for a target
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    triton.runtime.driver.set_active(Sm90())

    # The tensors the ops allocate (their outputs and scratch), by id; kept alive so that no
    # id is reused. A kernel may store to these only.
    allocated, alive = set(), []
    allocate = _common.new_tensor

    def recording_new_tensor(*args, **kwargs):
        tensor = allocate(*args, **kwargs)
        allocated.add(id(tensor))
        alive.append(tensor)
        return tensor

    for module in (_common, ball, compressed, select, selection, far_field):
        module.new_tensor = recording_new_tensor

    class Build:  # stands in for wrap_triton
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, num_warps=4, num_stages=3, maxnreg=None, **constexprs):
                signature, attrs = {}, {}
                for i, (name, value) in enumerate(zip(self.kernel.arg_names, args, strict=False)):
                    if isinstance(value, torch.Tensor):
                        signature[name] = "*" + types[value.dtype]
                        attrs[(i,)] = [["tt.divisibility", 16]]
                    else:
                        signature[name] = "fp32" if isinstance(value, float) else "i64"
                signature.update({name: "constexpr" for name in constexprs})
                key = (self.kernel.__name__, json.dumps(signature, sort_keys=True),
                       json.dumps(constexprs, sort_keys=True, default=str), num_warps, num_stages,
                       maxnreg)
                by_name = dict(zip(self.kernel.arg_names, args, strict=False))
                stored = written_arguments(self.kernel, {**by_name, **constexprs,
                                                         "num_warps": num_warps,
                                                         "num_stages": num_stages})
                inputs = sorted(name for name in stored if id(by_name[name]) not in allocated)
                if key in rows:
                    rows[key]["stores_to_inputs"] = sorted({*rows[key]["stores_to_inputs"], *inputs})
                    return
                source = ASTSource(self.kernel, signature, constexprs=constexprs, attrs=attrs)
                compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                          options=dict(num_warps=num_warps, num_stages=num_stages,
                                                       maxnreg=maxnreg))
                ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
                has_loop = "scf.for" in ttgir and "warp_group_dot" in ttgir
                report.append({
                    "kernel": self.kernel.__name__,
                    "dtype": signature.get("Q", signature.get("X", signature.get("DOUT", "?"))),
                    "warps": num_warps, "stages": num_stages,
                    "shared": compiled.metadata.shared,
                    # None: no multi-stage key loop to pipeline.
                    "pipelined": ("async_copy_global_to_local" in ttgir
                                  if num_stages > 1 and has_loop else None),
                    "div": len(re.findall(r"\bdiv\.", ptx)),
                    "sqrt": len(re.findall(r"\bsqrt\.", ptx)),
                    "ex2": len(re.findall(r"\bex2\.", ptx)),
                    "local": len(re.findall(r"\b(?:ld|st)\.local", ptx)),
                    "stores_to": ",".join(stored),
                    "stores_to_inputs": inputs,
                })
                rows[key] = report[-1]
            return launch

    for module in (_common, ball, compressed, select, selection, far_field):
        module.wrap_triton = Build
    # Clouds of 300 and 100 points have padding; of 256 and 128 none: the attention kernels'
    # variants without the mask (HAS_PADDING false), in bfloat16, the benchmarks' case.
    for dtype, D, sizes in ((torch.bfloat16, 64, [300, 100]), (torch.float32, 64, [300, 100]),
                            (torch.bfloat16, 64, [256, 128])):
        tree = random_tree(sizes, 128, 3, torch.float32, np.random.default_rng(0))
        M, H = tree.num_slots, 2
        q, k, v = (torch.randn(M, H, D, dtype=dtype, requires_grad=True) for _ in range(3))
        sigma = torch.randn(H, dtype=dtype, requires_grad=True)
        outs = [ops.ball_attention(q, k, v, tree, 128, sigma, 0.1),
                ops.ball_attention(q, k, v, tree, 16, sigma, 0.1)]
        for layout in ({"heads_inside": False, "block_m": 128, "block_n": 64, "warps": 4, "stages": 3},
                       {"heads_inside": True, "block_m": 128, "warps": 8, "stages": 2}):
            _common.CONFIG_OVERRIDES["ball_fwd"] = layout  # both kernels, whichever is the default
            outs.append(ops.ball_attention(q, k, v, tree, 128, sigma, 0.1))
        _common.CONFIG_OVERRIDES.pop("ball_fwd")
        k_cmp, v_cmp = ops.compress(k, tree, 32), ops.compress(v, tree, 32)
        out, lse = ops.compressed_attention(q, k_cmp, v_cmp, tree, 32, sigma, 0.1)
        outs.append(out)
        for layout in ({"keys_as_rows": False}, {"keys_as_rows": True}, {"heads_inside": True}):
            _common.CONFIG_OVERRIDES["select_blocks"] = layout  # the default and the candidates
            ops.select_blocks(q, k_cmp, torch.zeros_like(lse), tree, 32, 64, 64, 16, sigma, 0.1, None)
        _common.CONFIG_OVERRIDES.pop("select_blocks")
        indices = torch.arange(2, dtype=torch.int32).expand(M // 64, H, 2).contiguous()
        outs.append(ops.selection_attention(q, k, v, tree, indices, 64, 64, sigma, 0.1))
        # The tree far field (levels of 32, 64, 128, 256 slots): the descent's importance
        # kernel with a frontier in one tile (below the top) and in two passes (a tile cap of
        # 0 forces them), far-field attention forward and backward.
        levels = tree.levels(32, 2, 2)
        k_tok, v_tok = (ops.far_field_tokens(x, tree, levels) for x in (k_cmp, v_cmp))
        for cap in (128, 0):
            _common.CONFIG_OVERRIDES["far_field"] = {"importance_tile": cap}
            _, cut = ops.far_field_select(q, k_tok, tree, levels, 64, 2, sigma, 0.1)
        _common.CONFIG_OVERRIDES.pop("far_field")
        outs.append(ops.far_field_attention(q, k_tok, v_tok, tree, levels, cut, 64, sigma, 0.1))
        torch.autograd.grad(sum(o.float().sum() for o in outs), (q, k, v, sigma))
    return report


def written_arguments(kernel, arguments: dict) -> list[str]:
    """The tensor arguments that torch's analysis of `kernel` (the one `wrap_triton` runs under
    torch.compile) finds stored to. A kernel it finds storing to an input of its op fails
    under torch.compile ("a leaf Variable that requires grad is being used in an in-place
    operation"): the analysis follows pointers through jit functions, so offsets returned by a
    function that also takes an input's pointer count as pointing into that input."""
    import torch
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    if hasattr(wrap, "identify_accessed_tensors"):  # torch >= 2.12
        writes = wrap.identify_accessed_tensors(kernel, dict(arguments), {}).read_writes.writes
        names = [dep.name for dep in writes]
    else:
        names = wrap.identify_mutated_tensors(kernel, dict(arguments), {})
    return sorted(n for n in set(names) if isinstance(arguments.get(n), torch.Tensor))


# Kernels whose unpipelined multi-stage loop was measured to be the faster choice.
UNPIPELINED_BY_CHOICE = {
    # Its top-k insertion is a data-dependent loop inside the key loop. A straight-line bitonic
    # merge let the compiler pipeline it but measured slower on an H100 (2026-11-23, 256k
    # points, bfloat16: 24.7 ms against 22.6 ms), so the loop stayed.
    "_select_blocks_fwd_kernel",
    "_select_blocks_heads_kernel",  # the same insertion, in its head loop
}


def problems(report: list[dict]) -> list[str]:
    """What a GPU run would suffer from: shared memory over the limit (the launch fails) or a
    multi-stage key loop the compiler could not pipeline (every tile load waited for, for
    example because an inner data-dependent loop sits in it)."""
    found = [f"{r['kernel']} ({r['dtype']}): {r['shared']} bytes of shared memory"
             for r in report if r["shared"] > SHARED_LIMIT]
    found += [f"{r['kernel']} ({r['dtype']}, {r['stages']} stages): key loop not pipelined"
              for r in report
              if r["pipelined"] is False and r["kernel"] not in UNPIPELINED_BY_CHOICE]
    found += [f"{r['kernel']} ({r['dtype']}): torch.compile would see it store to its op's "
              f"input(s) {', '.join(r['stores_to_inputs'])}" for r in report if r["stores_to_inputs"]]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on a problem")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    report = build_all()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        keys = ["kernel", "dtype", "warps", "stages", "shared", "pipelined", "div", "sqrt",
                "ex2", "local", "stores_to"]
        print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
        for row in report:
            print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    found = problems(report)
    for line in found:
        print("PROBLEM:", line, file=sys.stderr)
    print(f"BUILT {len(report)} launches for sm_90, {len(found)} problems")
    if args.check and found:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
