"""The batches of a run. Each is a deterministic function of `(stream, seed, rank, step)`, so a
resumed run draws exactly the batches the uninterrupted run would have, and every
data-parallel rank draws its own.

Streams: training batches are the task's own `(seed, rank, step)` stream; validation (during
training) and test (`python -m sparseball eval`) each draw from a base seed mixed from
`(seed, stream)`, so neither ever holds a training batch.
"""

from __future__ import annotations

import numpy as np
import torch

from sparseball.tasks import PointCloudBatch, gravity

from .config import Config

STREAMS = {"train": 0, "validation": 1, "test": 2}


def stream_seed(seed: int, stream: str) -> int:
    """The base seed of a stream: `seed` itself for training, a 64-bit mix of `(seed,
    stream)` for the held-out streams."""
    if stream == "train":
        return seed
    return int(np.random.SeedSequence([seed, STREAMS[stream]]).generate_state(1, np.uint64)[0])


def draw(cfg: Config, stream: str, step: int, *, rank: int = 0, device: torch.device | str = "cpu",
         clouds: int | None = None, points: int | list[int] | None = None) -> PointCloudBatch:
    """Batch `step` of `rank` in `stream`: `clouds` clouds (default `cfg.clouds`) of `points`
    points (default `cfg.points`), targets in units of `cfg.target_unit`."""
    points = cfg.points if points is None else points
    return gravity(clouds or cfg.clouds, tuple(points) if isinstance(points, list) else points,
                   softening=cfg.softening, screening=cfg.screening,
                   seed=stream_seed(cfg.seed, stream), rank=rank, step=step, device=device,
                   acceleration_unit=cfg.target_unit)


def model_inputs(cfg: Config, batch: PointCloudBatch) -> tuple[torch.Tensor, ...]:
    """`(x, pos, batch)` of the model: each mass times its cloud's point count (a cloud's masses
    sum to 1, so these are O(1), mean 1, whatever the cloud size) and positions in units of
    `cfg.length_unit`."""
    counts = torch.bincount(batch.batch)
    x = batch.x * counts[batch.batch, None].to(batch.x.dtype)
    return x, batch.pos / cfg.length_unit, batch.batch
