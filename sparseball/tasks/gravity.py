"""Self-gravitating clouds of clustered masses, with their exact accelerations as targets.

`gravity` draws clouds of point masses and returns, for every point, the acceleration that all
other points of its cloud exert on it (G = 1), summed directly over all pairs: no tree code, no
approximation, so a model that learns long-range interactions can be scored against the truth.
`gravitational_acceleration` is that direct sum on its own, for any packed clouds.

The law. Points i, j of one cloud at `p_i`, `p_j` with masses `m_j`, `r = |p_j - p_i|`, softening
`eps` and softened distance `s = sqrt(r^2 + eps^2)`. Point j exerts on i the potential

    phi_j(p_i) = -m_j / s                     (Plummer-softened Newton, `screening=None`)
    phi_j(p_i) = -m_j exp(-s / lam) / s       (Yukawa, screening length `lam = screening`)

and the acceleration is exactly its gradient, `a_i = -sum_{j != i} grad_{p_i} phi_j`:

    a_i = sum_{j != i} m_j (p_j - p_i) / s^3                             (screening=None)
    a_i = sum_{j != i} m_j (p_j - p_i) (1 + s / lam) exp(-s / lam) / s^3  (screening=lam)

The pair factor is symmetric in i and j, so momentum is conserved: `sum_i m_i a_i = 0` in every
cloud. Screening turns the interaction from global (every point feels every cluster) to local
(beyond a few `lam` a pair's pull decays exponentially); `lam -> inf` recovers Newton.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .._checks import check_int
from .batch import PointCloudBatch

__all__ = ["gravitational_acceleration", "gravity"]

# The clouds of `gravity`, before they are scaled into the unit cube: 2 to 8 Plummer spheres
# per cloud, with centres uniform in the unit cube and scale radii log-uniform in CLUSTER_SCALES,
# each truncated at PLUMMER_TRUNCATION scale radii (94% of an untruncated sphere's mass).
# Masses are log-normal with log standard deviation MASS_LOG_STD.
MIN_CLUSTERS, MAX_CLUSTERS = 2, 8
CLUSTER_SCALES = (0.01, 0.1)
PLUMMER_TRUNCATION = 5.0
MASS_LOG_STD = 1.0

# Pairs (query rows x keys of their cloud) per chunk of the direct sum. A chunk holds one (Newton)
# to three (Yukawa) float64 temporaries of that many elements, up to 384 MiB for 2^24 pairs on a
# GPU, where big chunks amortise the 5 (Newton) to 10 kernel launches of a chunk; on a CPU, chunks of 2^20
# pairs stay in cache and ran 2-3x faster than 2^22. Tests lower both to exercise the chunking.
CHUNK_PAIRS = 1 << 24
CPU_CHUNK_PAIRS = 1 << 20


def gravity(
    num_clouds: int,
    num_points: int | tuple[int, int],
    *,
    softening: float = 0.01,
    screening: float | None = None,
    seed: int = 0,
    rank: int = 0,
    step: int = 0,
    device: torch.device | str = "cpu",
    acceleration_unit: float = 1.0,
) -> PointCloudBatch:
    """Clouds of clustered point masses and the exact acceleration of every point.

    Each cloud holds 2 to 8 Plummer spheres (scale radius `a` log-uniform in [0.01, 0.1], centre
    uniform in the unit cube, radii drawn from the Plummer mass profile,
    `r = a / sqrt(u^(-2/3) - 1)`, truncated at `5 a`) sharing the cloud's points in random
    (Dirichlet) proportions; each point picks its sphere independently, so points come in no
    particular order. The cloud is then shifted and uniformly scaled so that its bounding box is
    centred in the unit cube `[0, 1]^3` with its longest side exactly 1. Masses are log-normal
    (log standard deviation 1), normalised so that each cloud's total mass is 1.

    Targets are the accelerations of the module docstring (G = 1), from all other points of the
    same cloud: clouds of a batch never interact. With a cloud's mass fixed at 1 in a unit box
    the acceleration field does not grow with the number of points: its size is set by the
    clusters. A cluster of mass M and scale radius a pulls at up to ~0.4 M / (a^2 + eps^2) near
    its centre, so with the defaults |a| spans ~1 (between clusters) to ~10^3 (inside the
    tightest ones): over 48 clouds of 4096 points its median was 67, its RMS 200, its 99th
    percentile 790 (screening 0.05: 50, 180, 740). It never exceeds 0.385 / eps^2 (3849 for
    eps = 0.01). For a model, `acceleration_unit=100` gives O(1) targets:
    `y = a / acceleration_unit` and `y_unit = acceleration_unit`, so `y * y_unit` is always
    the acceleration.

    Generation runs on the CPU with its own `torch.Generator`, so a seed gives the same clouds
    on every device; only the direct sum runs on `device`. The stream is seeded by
    `(seed, rank, step)` through `numpy.random.SeedSequence`: data-parallel ranks and training
    steps draw different, reproducible batches, and the same arguments give bit-identical
    batches on the same device.

    The direct sum (`gravitational_acceleration`) costs `n^2` pair terms per cloud of n points
    and runs in float64 on every device, so `y` is the float32 rounding of the exact value.

    Args:
        num_clouds (int): B >= 1 clouds.
        num_points (int | tuple[int, int]): points per cloud: an int >= 2 gives every cloud
            that many; a pair `(low, high)`, `2 <= low <= high`, draws each cloud's size
            uniformly from `low..high` inclusive (variable sizes within a batch).
        softening (float): Plummer softening length eps > 0, in the unit-cube scale.
        screening (float | None): Yukawa screening length lam > 0, or None for Newtonian gravity.
        seed (int): base seed >= 0.
        rank (int): data-parallel rank >= 0 (e.g. `torch.distributed.get_rank()`).
        step (int): training step or epoch >= 0, so each step gets a fresh batch.
        device (torch.device | str): where the direct sum runs and the tensors live.
        acceleration_unit (float): > 0; `y` is the acceleration divided by it.

    Returns:
        PointCloudBatch: on `device`, N = total points:
        `pos` `[N, 3]` float32 in `[0, 1]`; `batch` `[N]` int64, sorted (cloud 0 first);
        `x` `[N, 1]` float32, `x[:, 0]` the mass (a cloud's masses sum to 1, so `m * n` is
        O(1)); `y` `[N, 3]` float32, the acceleration over `acceleration_unit`;
        `y_unit = acceleration_unit`.
    """
    check_int("num_clouds", num_clouds, minimum=1)
    _check_num_points(num_points)
    _check_positive("softening", softening)
    if screening is not None:
        _check_positive("screening", screening, allow_inf=True)
    check_int("seed", seed, minimum=0)
    check_int("rank", rank, minimum=0)
    check_int("step", step, minimum=0)
    device = _check_device(device)
    _check_positive("acceleration_unit", acceleration_unit)

    generator = torch.Generator().manual_seed(stream_seed(seed, rank, step))
    if isinstance(num_points, int):
        sizes = [num_points] * num_clouds
    else:
        low, high = num_points
        sizes = torch.randint(low, high + 1, (num_clouds,), generator=generator).tolist()
    pos, mass = _clustered_masses(sizes, generator)
    batch = torch.repeat_interleave(torch.arange(num_clouds), torch.tensor(sizes))

    pos, mass = pos.to(device), mass.to(device)
    acceleration = _direct_sum(pos.double(), mass.double(), sizes, softening, screening)
    return PointCloudBatch(
        pos=pos,
        batch=batch.to(device),
        x=mass.unsqueeze(1),
        y=(acceleration / acceleration_unit).to(torch.float32),
        y_unit=float(acceleration_unit),
    )


def gravitational_acceleration(
    pos: torch.Tensor,
    mass: torch.Tensor,
    batch: torch.Tensor | None = None,
    *,
    softening: float,
    screening: float | None = None,
) -> torch.Tensor:
    """The acceleration of every point from all other points of its cloud, summed directly.

    The formulas are the module docstring's (G = 1; the law is 3-D, but any `dim` works). A
    point exerts no force on itself, nor on a point at the very same position.

    Runs on the device of `pos`, in float64 whatever the input dtype: each cloud in chunks of
    query rows against all its keys (`CHUNK_PAIRS` pairs per chunk on a GPU, `CPU_CHUNK_PAIRS`
    on a CPU), so memory stays O(chunk + N) however large the cloud. The error before the final
    rounding to the dtype of `pos` is ~1e-16 of `sum_j w_ij |p_j - c|` (`w_ij` the pair factor
    times `m_j`, `c` a point of the cloud): far below float32 rounding unless the softening is
    below ~1e-8 of the cloud's size. Why float64 on a GPU too: the sum is bound by memory
    traffic, not arithmetic, and an H200 runs float64 at half its float32 rate.

    Args:
        pos (torch.Tensor): float positions of shape `[N, dim]`.
        mass (torch.Tensor): float masses of shape `[N]`, on the device of `pos`.
        batch (torch.Tensor | None): int64 cloud id >= 0 of each point, shape `[N]`, any order;
            None for one cloud.
        softening (float): Plummer softening length eps > 0.
        screening (float | None): Yukawa screening length lam > 0, or None for Newtonian gravity.

    Returns:
        torch.Tensor: accelerations of shape `[N, dim]` in the dtype of `pos`.
    """
    _check_points(pos, mass, batch)
    _check_positive("softening", softening)
    if screening is not None:
        _check_positive("screening", screening, allow_inf=True)

    order = None
    if batch is None:
        sizes = [pos.shape[0]]
    else:
        sizes = torch.bincount(batch).tolist()
        if batch.numel() > 1 and not bool((batch[1:] >= batch[:-1]).all()):
            order = torch.argsort(batch, stable=True)
            pos, mass = pos[order], mass[order]
    acceleration = _direct_sum(pos.double(), mass.double(), sizes, softening, screening)
    if order is not None:
        acceleration = torch.zeros_like(acceleration).index_copy_(0, order, acceleration)
    return acceleration.to(pos.dtype)


def stream_seed(seed: int, rank: int = 0, step: int = 0) -> int:
    """A 64-bit seed for `torch.Generator.manual_seed`, distinct and well mixed per
    `(seed, rank, step)` (all ints >= 0)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0])


# Clouds


def _clustered_masses(sizes: list[int], generator: torch.Generator):
    """Positions `[N, 3]` and masses `[N]`, float32 on the CPU, of clouds of `sizes` points
    (see `gravity`), drawn from `generator` in a fixed order."""
    num_clouds, total = len(sizes), sum(sizes)
    cloud = torch.repeat_interleave(torch.arange(num_clouds), torch.tensor(sizes))

    def uniform(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    num_clusters = torch.randint(MIN_CLUSTERS, MAX_CLUSTERS + 1, (num_clouds,), generator=generator)
    # Normalised exponentials are Dirichlet(1, ..., 1) shares of the cloud's points.
    share = -torch.log1p(-uniform(num_clouds, MAX_CLUSTERS))
    share = share * (torch.arange(MAX_CLUSTERS) < num_clusters.unsqueeze(1))
    bounds = share.cumsum(1) / share.sum(1, keepdim=True)
    centres = uniform(num_clouds, MAX_CLUSTERS, 3)
    low, high = math.log(CLUSTER_SCALES[0]), math.log(CLUSTER_SCALES[1])
    scale_radii = torch.exp(low + (high - low) * uniform(num_clouds, MAX_CLUSTERS))

    cluster = torch.searchsorted(bounds[cloud], uniform(total, 1)).squeeze(1)
    cluster = torch.minimum(cluster, num_clusters[cloud] - 1)  # bounds[-1] may round below 1
    # Plummer: the mass inside r is M (1 + a^2 / r^2)^(-3/2); invert it at a uniform fraction
    # below the truncation radius's.
    fraction = uniform(total) * (1 + PLUMMER_TRUNCATION**-2) ** -1.5
    radius = scale_radii[cloud, cluster] / torch.sqrt(fraction.pow(-2 / 3) - 1)
    direction = torch.randn(total, 3, generator=generator, dtype=torch.float64)
    direction /= direction.norm(dim=1, keepdim=True).clamp(min=1e-300)
    pos = centres[cloud, cluster] + radius.unsqueeze(1) * direction

    index = cloud.unsqueeze(1).expand(-1, 3)
    lo = torch.full((num_clouds, 3), math.inf, dtype=torch.float64).scatter_reduce(
        0, index, pos, "amin")
    hi = torch.full((num_clouds, 3), -math.inf, dtype=torch.float64).scatter_reduce(
        0, index, pos, "amax")
    extent = (hi - lo).amax(1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    margin = (1 - (hi - lo) / extent) / 2
    pos = ((pos - lo[cloud]) / extent[cloud] + margin[cloud]).clamp(0, 1)

    mass = torch.exp(MASS_LOG_STD * torch.randn(total, generator=generator, dtype=torch.float64))
    mass /= torch.zeros(num_clouds, dtype=torch.float64).index_add(0, cloud, mass)[cloud]
    return pos.to(torch.float32), mass.to(torch.float32)


# The direct sum


def _direct_sum(pos: torch.Tensor, mass: torch.Tensor, sizes: list[int], softening: float,
                screening: float | None) -> torch.Tensor:
    """Accelerations `[N, dim]` of the points `pos` `[N, dim]` with masses `mass` `[N]`, packed
    cloud after cloud with `sizes` points each, in the dtype and on the device of `pos`."""
    out = torch.zeros_like(pos)
    budget = CHUNK_PAIRS if pos.device.type != "cpu" else min(CHUNK_PAIRS, CPU_CHUNK_PAIRS)
    softening2 = torch.tensor(softening**2, dtype=pos.dtype, device=pos.device)
    start = 0
    for n in sizes:
        if n > 1:
            _cloud_acceleration(pos[start:start + n], mass[start:start + n], softening2,
                                screening, max(1, budget // n), out[start:start + n])
        start += n
    return out


def _cloud_acceleration(pos: torch.Tensor, mass: torch.Tensor, softening2: torch.Tensor,
                        screening: float | None, rows: int, out: torch.Tensor) -> None:
    """Writes into `out` `[n, dim]` the accelerations within one cloud (`pos` `[n, dim]`,
    `mass` `[n]`, float64), `rows` queries at a time against all n keys. `f_ij` is the pair
    factor of the module docstring, `1 / s^3` or `(1 + s / lam) exp(-s / lam) / s^3`.

    Distances come from coordinate differences, axis by axis (no Gram-matrix shortcut, which
    would lose the close pairs, the largest terms, to cancellation). The weighted sum
    `sum_j m_j f_ij (p_j - p_i)` is one matrix product, `sum_j f_ij m_j p_j - (sum_j f_ij m_j)
    p_i`, which reads each chunk once. Its two sums cancel to within ~1e-16 of
    `sum_j |m_j f_ij| |p_j|`; positions taken relative to a point of the cloud (exactly, for
    float32 data) keep that relative to the cloud's size rather than its distance from the
    origin.
    """
    pos = pos - pos[0]
    keys = torch.cat([pos, torch.ones_like(pos[:, :1])], dim=1) * mass.unsqueeze(1)  # `[n, dim + 1]`
    for first in range(0, pos.shape[0], rows):
        queries = pos[first:first + rows]
        # s^2 = |p_j - p_i|^2 + eps^2, summed axis by axis: cdist's exact mode (the other one
        # loses digits) is a slow generic kernel on CUDA (on an H200 it made a training step of
        # 16 x 4096 points take 430 ms, of which the model needs 45).
        weight = (queries[:, None, 0] - pos[None, :, 0]).square_()
        for axis in range(1, pos.shape[1]):
            weight.add_((queries[:, None, axis] - pos[None, :, axis]).square_())
        weight.add_(softening2)  # s^2, then f(s)
        if screening is None:
            weight.pow_(-1.5)
        else:
            reduced = weight.sqrt().div_(screening)  # s / lam
            weight.pow_(-1.5).mul_(reduced.neg().exp_()).mul_(reduced.add_(1))
        # A point's own term is exactly 0, but would come back as the rounding error of two
        # equal sums of size m_i / eps^3: drop it.
        weight.diagonal(first).zero_()
        sums = weight @ keys
        out[first:first + rows] = sums[:, :-1] - sums[:, -1:] * queries


# Argument checks


def _check_num_points(num_points: object) -> None:
    expected = "an int >= 2 or a (low, high) pair of ints with 2 <= low <= high"
    if isinstance(num_points, (tuple, list)):
        if (len(num_points) != 2 or not all(isinstance(n, int) and not isinstance(n, bool)
                                            for n in num_points)
                or not 2 <= num_points[0] <= num_points[1]):
            raise ValueError(f"num_points must be {expected}, got {num_points!r}")
        return
    if not isinstance(num_points, int) or isinstance(num_points, bool):
        raise TypeError(f"num_points must be {expected}, got {type(num_points).__name__}")
    if num_points < 2:
        raise ValueError(f"num_points must be {expected}, got {num_points}")


def _check_positive(name: str, value: object, *, allow_inf: bool = False) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__}")
    if not value > 0 or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a positive{'' if allow_inf else ', finite'} number, "
                         f"got {value}")


def _check_device(device: object) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device must be a torch.device or a name such as 'cpu' or 'cuda', got {device!r}"
        ) from error
    try:
        torch.zeros(1, device=device)
    except (RuntimeError, AssertionError) as error:
        raise ValueError(f"device {device} is not available here: {error}") from error
    return device


def _check_points(pos: object, mass: object, batch: object) -> None:
    if not isinstance(pos, torch.Tensor) or pos.ndim != 2 or not pos.is_floating_point():
        raise ValueError(f"pos must be a float tensor of shape [N, dim], got {_describe(pos)}")
    count = pos.shape[0]
    if (not isinstance(mass, torch.Tensor) or tuple(mass.shape) != (count,)
            or not mass.is_floating_point()):
        raise ValueError(f"mass must be a float tensor of shape [{count}], got {_describe(mass)}")
    if mass.device != pos.device:
        raise ValueError(f"mass must be on the device of pos ({pos.device}), got {mass.device}")
    if batch is None:
        return
    if (not isinstance(batch, torch.Tensor) or tuple(batch.shape) != (count,)
            or batch.dtype != torch.int64):
        raise ValueError(f"batch must be an int64 tensor of shape [{count}] or None, "
                         f"got {_describe(batch)}")
    if batch.device != pos.device:
        raise ValueError(f"batch must be on the device of pos ({pos.device}), got {batch.device}")
    if count and int(batch.min()) < 0:
        raise ValueError(f"batch must hold cloud ids >= 0, got {int(batch.min())}")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__
