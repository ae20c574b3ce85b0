"""`python -m sparseball demo`: trees and sparse attention on a synthetic batch, every backend,
then a short training run.

Builds ball trees for clustered 3-D clouds of mixed sizes (plus one cloud of a million points
on a GPU), runs `sparseball.attention` forward and backward on each backend that can serve the
inputs, checks the backends against each other and prints what it measured. Then trains the
default model (ErwinNSA) and its ball-only baseline side by side on the gravity task (same
steps, data and seed) and prints both validation errors. `quick=True` (`--quick`) keeps one
small batch in one dtype per device and skips the training: a check that an install works.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

import sparseball
from sparseball.backends import BACKENDS, FLAT_OPS
from sparseball.tree import _resolve_builder

CLOUD_SIZES = (4097, 3000, 1500, 777, 64, 1)
QUICK_CLOUD_SIZES = (1025, 300, 64, 1)
# The training part: the default model at a size that trains in about half a minute per model
# on two CPU cores.
TRAINING = dict(clouds=8, points=256, steps=150, eval_every=50)


@dataclass
class Row:
    what: str
    backend: str
    milliseconds: float
    max_difference: float | None = None


def clustered_cloud(num_points: int, generator: torch.Generator, dim: int = 3) -> torch.Tensor:
    """`[num_points, dim]` float32 points in a few Gaussian clusters of different widths."""
    num_clusters = max(1, min(8, num_points // 256))
    centers = torch.randn(num_clusters, dim, generator=generator) * 10
    widths = torch.rand(num_clusters, 1, generator=generator) + 0.2
    which = torch.randint(num_clusters, (num_points,), generator=generator)
    noise = torch.randn(num_points, dim, generator=generator)
    return centers[which] + widths[which] * noise


def synthetic_batch(sizes: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clouds of `sizes` points packed as (pos `[N, 3]`, batch `[N]`), points shuffled."""
    generator = torch.Generator().manual_seed(seed)
    pos = torch.cat([clustered_cloud(n, generator) for n in sizes])
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    shuffle = torch.randperm(pos.shape[0], generator=generator)
    return pos[shuffle], batch[shuffle]


def _timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, (time.perf_counter() - start) * 1e3


def _attention_backends(device: torch.device, dtype: torch.dtype, head_dim: int) -> list[str]:
    """Backends that can run every op on such inputs."""
    return [
        name for name, backend in BACKENDS.items()
        if not any(backend.not_supported_reasons(op, device, dtype, head_dim) for op in FLAT_OPS)
    ]


def run_case(label: str, pos: torch.Tensor, batch: torch.Tensor | None, *, heads: int,
             head_dim: int, dtype: torch.dtype, ball_size: int, progress: tqdm) -> list[Row]:
    """Tree build and attention forward/backward on every backend for one batch of clouds."""
    device = pos.device
    rows = []
    sparseball.build_tree(pos, batch, ball_size=ball_size)  # warm the JIT
    progress.set_postfix_str(f"{label}: tree")
    tree, ms = _timed(lambda: sparseball.build_tree(pos, batch, ball_size=ball_size), device)
    builder = _resolve_builder("auto", device)
    rows.append(Row(f"{label} tree ({tree.num_points} pts -> {tree.num_slots} slots)", builder, ms))
    progress.update()

    generator = torch.Generator(device=device).manual_seed(1)
    shape = (tree.num_slots, heads, head_dim)
    q, k, v = (torch.randn(shape, generator=generator, device=device, dtype=dtype)
               for _ in range(3))
    sigma = -torch.rand(heads, generator=generator, device=device, dtype=dtype)
    grad_out = torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def forward_backward(backend: str, compute_dtype: torch.dtype) -> list[torch.Tensor]:
        inputs = [t.to(compute_dtype, copy=True).requires_grad_() for t in (q, k, v, sigma)]
        out = sparseball.attention(*inputs[:3], tree, sigma=inputs[3], backend=backend)
        out.backward(grad_out.to(compute_dtype))
        return [out.detach(), *(t.grad for t in inputs)]

    # Small batches are checked against the torch backend in float64, the 1M cloud (too big
    # for that) against the torch backend in its own dtype.
    small = tree.num_slots <= 100_000
    baseline = forward_backward("torch", torch.float64 if small else dtype)
    for backend in _attention_backends(device, dtype, head_dim):
        progress.set_postfix_str(f"{label}: {backend}")
        forward_backward(backend, dtype)  # warm up kernels and caches
        result, ms = _timed(lambda backend=backend: forward_backward(backend, dtype), device)
        # Relative to each tensor's largest entry: sigma's gradient sums over every pair.
        difference = max(float((a.double() - b.double()).abs().max() / b.double().abs().max())
                         for a, b in zip(result, baseline, strict=True))
        rows.append(Row(f"{label} attention fwd+bwd ({str(dtype)[6:]})", backend, ms, difference))
        progress.update()
    return rows


def main(seed: int = 0, quick: bool = False) -> None:
    cpu = torch.device("cpu")
    sizes = QUICK_CLOUD_SIZES if quick else CLOUD_SIZES
    cases = [("cpu batch", cpu, sizes, torch.float32)]
    if not quick:
        cases.append(("cpu batch", cpu, sizes, torch.bfloat16))
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        cases.append(("gpu batch", cuda, sizes, torch.bfloat16))
        if not quick:
            cases.append(("gpu 1M cloud", cuda, (1 << 20,), torch.bfloat16))
    print(f"sparseball {sparseball.__version__} demo: torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads"
          + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print(f"backends: {', '.join(BACKENDS)}; heads 4, head dim 32\n")

    total_steps = sum(1 + len(_attention_backends(device, dtype, 32))
                      for _, device, _, dtype in cases)
    rows = []
    with tqdm(total=total_steps, desc="demo", unit="step") as progress:
        for label, device, sizes, dtype in cases:
            pos, batch = synthetic_batch(sizes, seed)
            rows += run_case(label, pos.to(device), batch.to(device), heads=4, head_dim=32,
                             dtype=dtype, ball_size=64, progress=progress)

    width = max(len(row.what) for row in rows)
    print(f"\n{'what':<{width}}  {'backend':<8} {'time (ms)':>10}  max rel. diff vs torch float64*")
    for row in rows:
        diff = "" if row.max_difference is None else f"{row.max_difference:.2e}"
        print(f"{row.what:<{width}}  {row.backend:<8} {row.milliseconds:>10.1f}  {diff}")
    print("* max |a - b| / max |b| over the output and the gradients of q, k, v and sigma;\n"
          "  the 1M cloud against torch in its own dtype")
    if not quick:
        train_side_by_side(seed)


def train_side_by_side(seed: int = 0) -> None:
    """The default model and its ball-only baseline, trained with the same steps, data and seed;
    prints their validation errors before and after."""
    from sparseball.training import Config, train
    from sparseball.training.metrics import read_log

    base = Config(seed=seed, **TRAINING)
    print(f"\ntraining on {base.task}: {base.clouds} clouds x {base.points} points per step, "
          f"{base.steps} steps, seed {seed}")
    rows = []
    with tempfile.TemporaryDirectory() as runs:
        for model in ("nsa", "ball"):
            start = time.perf_counter()
            result = train(replace(base, model=model, out=str(Path(runs) / model)), plot=False)
            before = read_log(result.run)[0]["eval_rel_l2"]
            parameters = sum(p.numel() for p in result.model.parameters())
            rows.append((model, parameters, before, result.eval["rel_l2"],
                         time.perf_counter() - start))
    header = f"validation rel. L2: step 0  step {base.steps}"
    print(f"\n{'model':<6} {'parameters':>10}  {header}  {'time':>6}")
    for model, parameters, before, after, seconds in rows:
        print(f"{model:<6} {parameters:>10,}  {before:>{len(header) - 10}.3f}  {after:>8.3f}  "
              f"{seconds:>4.0f} s")
    print("rel. L2: |prediction - acceleration| / |acceleration| over the validation points\n"
          "(predicting zero scores 1). `python -m sparseball train` runs the full default.")
