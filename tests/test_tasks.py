"""sparseball.tasks: the gravity task against an independent float64 NumPy direct sum, its
physics (momentum, the potential it derives from, two bodies by hand), its seeding, layout and
argument checks."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparseball.tasks import PointCloudBatch, gravitational_acceleration, gravity

# The module, not the function `sparseball.tasks.gravity` that shadows it as an attribute.
gravity_module = importlib.import_module("sparseball.tasks.gravity")

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps

# Cloud sizes: the smallest (2), odd ones, and any.
SIZES = st.one_of(st.sampled_from([2, 3, 7, 31]), st.integers(2, 40))
SOFTENINGS = st.sampled_from([1e-3, 0.01, 0.1])
SCREENINGS = st.sampled_from([None, None, 0.02, 0.1, 1.0])
# Pairs per chunk: one query row per chunk, a few rows, the defaults.
CHUNK_BUDGETS = st.sampled_from([1, 50, None])


@contextlib.contextmanager
def chunk_pairs(pairs: int | None):
    """Within the block the direct sum takes chunks of `pairs` pairs on every device (None:
    the defaults)."""
    saved = gravity_module.CHUNK_PAIRS, gravity_module.CPU_CHUNK_PAIRS
    if pairs is not None:
        gravity_module.CHUNK_PAIRS = gravity_module.CPU_CHUNK_PAIRS = pairs
    try:
        yield
    finally:
        gravity_module.CHUNK_PAIRS, gravity_module.CPU_CHUNK_PAIRS = saved


def numpy_acceleration(pos, mass, batch, softening, screening):
    """The oracle: float64 NumPy, cloud by cloud, every pair j != i by broadcasting, from the
    formula as the docstring states it:
    `a_i = sum_{j != i} m_j (p_j - p_i) f(s)`, `s = sqrt(|p_j - p_i|^2 + eps^2)`,
    `f(s) = 1 / s^3`, or `(1 + s / lam) exp(-s / lam) / s^3` with screening `lam`.

    Returns the accelerations `[N, dim]` and, per point, `magnitude` `[N]` = the cloud's
    diameter times `sum_j |m_j f(s_ij)| (1 + s_ij / lam)`: the size of the sums whose rounding
    the direct sum may show (see `assert_matches_oracle`); exp turns the relative rounding of
    s into a relative error of its term s / lam times larger, here and in the oracle alike.
    """
    pos, mass, batch = (np.asarray(t, dtype=np.float64) for t in (pos, mass, batch))
    out = np.zeros_like(pos)
    magnitude = np.zeros(len(pos))
    for cloud in np.unique(batch):
        idx = np.flatnonzero(batch == cloud)
        p, m = pos[idx], mass[idx]
        d = p[None, :, :] - p[:, None, :]  # d[i, j] = p_j - p_i
        s = np.sqrt((d**2).sum(-1) + softening**2)
        f = s**-3.0 if screening is None else (1 + s / screening) * np.exp(-s / screening) / s**3
        w = m[None, :] * f
        np.fill_diagonal(w, 0.0)
        out[idx] = (w[:, :, None] * d).sum(1)
        diameter = np.sqrt((d**2).sum(-1)).max()
        amplification = 1 if screening is None else 1 + s / screening
        magnitude[idx] = diameter * (np.abs(w) * amplification).sum(1)
    return out, magnitude


def assert_matches_oracle(actual: torch.Tensor, expected: np.ndarray, magnitude: np.ndarray,
                          *, scale: float = 1.0):
    """`actual * scale` is the oracle's `expected` up to its final rounding to the dtype of
    `actual` (eps |expected|, or underflow below its smallest normal number) and float64
    rounding in the sums: the implementation's `sum_j w_ij p_j - (sum_j w_ij) p_i` cancels
    terms of size `magnitude` (row), so 64 * eps64 * magnitude covers a few roundings each
    with room."""
    assert not torch.isnan(actual).any()
    got = actual.double().cpu().numpy() * scale
    info = torch.finfo(actual.dtype)
    bound = info.eps * np.abs(expected) + info.tiny * scale + 64 * EPS64 * magnitude[:, None]
    error = np.abs(got - expected)
    bad = error > bound
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.size} off the oracle; worst error/bound "
        f"{float((error / np.maximum(bound, 1e-300)).max()):.3g}; got {got[bad][:4]}, "
        f"expected {expected[bad][:4]}")


# Against the oracle


@given(
    num_clouds=st.integers(1, 3),
    num_points=st.one_of(SIZES, st.tuples(st.integers(2, 8), st.integers(8, 40))),
    softening=SOFTENINGS,
    screening=SCREENINGS,
    acceleration_unit=st.sampled_from([1.0, 100.0]),
    seed=st.integers(0, 2**32),
    budget=CHUNK_BUDGETS,
)
def test_gravity_matches_numpy(num_clouds, num_points, softening, screening, acceleration_unit,
                               seed, budget):
    with chunk_pairs(budget):
        data = gravity(num_clouds, num_points, softening=softening, screening=screening,
                       seed=seed, acceleration_unit=acceleration_unit)
    expected, magnitude = numpy_acceleration(data.pos, data.x[:, 0], data.batch, softening,
                                             screening)
    assert data.y_unit == acceleration_unit
    assert_matches_oracle(data.y, expected, magnitude, scale=acceleration_unit)


@given(
    sizes=st.lists(st.one_of(SIZES, st.sampled_from([0, 1])), min_size=1, max_size=4),
    dim=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    softening=SOFTENINGS,
    screening=SCREENINGS,
    seed=st.integers(0, 2**32),
    budget=CHUNK_BUDGETS,
)
def test_acceleration_matches_numpy_in_any_order(sizes, dim, dtype, softening, screening, seed,
                                                 budget):
    """Any positions and masses (of either sign), clouds of 0 and 1 points, points of all
    clouds shuffled together."""
    rng = np.random.default_rng(seed)
    batch = torch.from_numpy(rng.permutation(np.repeat(np.arange(len(sizes)), sizes)))
    pos = torch.from_numpy(rng.normal(size=(batch.numel(), dim)) * rng.uniform(0.01, 3)).to(dtype)
    mass = torch.from_numpy(rng.normal(size=batch.numel())).to(dtype)
    with chunk_pairs(budget):
        acceleration = gravitational_acceleration(pos, mass, batch, softening=softening,
                                                  screening=screening)
    assert acceleration.dtype == dtype and acceleration.shape == pos.shape
    expected, magnitude = numpy_acceleration(pos, mass, batch, softening, screening)
    assert_matches_oracle(acceleration, expected, magnitude)


@pytest.mark.parametrize("screening", [None, 0.05])
def test_clouds_far_from_the_origin_lose_no_precision(screening):
    """Cancellation in the sums scales with the cloud's size, not its distance from the origin
    (here 10^4 times the cloud's size): the oracle's bound holds in float64."""
    data = gravity(2, 200, seed=3)
    pos = (data.pos + torch.tensor([1e4, -2e4, 3e4])).double()  # float32 values, exactly
    mass = data.x[:, 0].double()
    acceleration = gravitational_acceleration(pos, mass, data.batch, softening=0.01,
                                              screening=screening)
    assert_matches_oracle(acceleration, *numpy_acceleration(pos, mass, data.batch, 0.01,
                                                            screening))


@pytest.mark.parametrize("screening", [None, 0.05])
def test_clouds_do_not_interact(screening):
    data = gravity(3, (20, 60), screening=screening, seed=5)
    for cloud in range(3):
        own = data.batch == cloud
        alone = gravitational_acceleration(data.pos[own], data.x[own, 0], softening=0.01,
                                           screening=screening)
        assert torch.equal(alone, data.y[own])


@pytest.mark.parametrize("budget", [1, 7, 64 * 5 + 3])
def test_chunking_gives_the_same_sums(budget):
    data = gravity(2, 64, screening=0.1, seed=3)
    pos, mass = data.pos.double(), data.x[:, 0].double()
    whole = gravitational_acceleration(pos, mass, data.batch, softening=0.01, screening=0.1)
    with chunk_pairs(budget):
        chunked = gravitational_acceleration(pos, mass, data.batch, softening=0.01,
                                             screening=0.1)
    torch.testing.assert_close(chunked, whole, rtol=1e-13, atol=1e-13 * float(whole.abs().max()))


# Physics


@pytest.mark.parametrize("screening", [None, 0.05])
def test_momentum_is_conserved(screening):
    """The pair factor is symmetric, so `sum_i m_i a_i = 0` in every cloud (Newton's third law).
    In float64 the sum is zero up to rounding of its terms `m_i |a_i|`."""
    data = gravity(3, 300, screening=screening, seed=11)
    mass = data.x[:, 0].double()
    acceleration = gravitational_acceleration(data.pos.double(), mass, data.batch,
                                              softening=0.01, screening=screening)
    for cloud in range(3):
        own = data.batch == cloud
        force = mass[own, None] * acceleration[own]
        assert float(force.sum(0).norm()) <= 1e-12 * float(force.norm(dim=1).sum())


@pytest.mark.parametrize("screening", [None, 0.3, math.inf])
def test_acceleration_is_minus_the_gradient_of_the_potential(screening):
    """`a_i = -grad_i U / m_i` with `U = 1/2 sum_{i != j} m_i m_j phi(s_ij)`, `phi(s) = -1/s` or
    `-exp(-s/lam)/s`, differentiated by autograd."""
    generator = torch.Generator().manual_seed(0)
    pos = torch.rand(17, 3, generator=generator, dtype=torch.float64).requires_grad_()
    mass = torch.rand(17, generator=generator, dtype=torch.float64) + 0.1
    s = ((pos[:, None] - pos[None]).square().sum(-1) + 0.05**2).sqrt()
    phi = -1 / s if screening is None else -torch.exp(-s / screening) / s
    energy = 0.5 * (mass[:, None] * mass[None] * phi).fill_diagonal_(0).sum()
    (gradient,) = torch.autograd.grad(energy, pos)
    acceleration = gravitational_acceleration(pos.detach(), mass, softening=0.05,
                                              screening=screening)
    torch.testing.assert_close(acceleration, -gradient / mass[:, None], rtol=1e-12, atol=1e-12)


def test_two_bodies_by_hand():
    r, eps, lam, m0, m1 = 0.3, 0.04, 0.2, 0.25, 0.75
    pos = torch.tensor([[0.1, 0.2, 0.3], [0.1 + r, 0.2, 0.3]], dtype=torch.float64)
    mass = torch.tensor([m0, m1], dtype=torch.float64)
    s = math.hypot(r, eps)
    for screening, factor in ((None, 1.0), (lam, (1 + s / lam) * math.exp(-s / lam))):
        acceleration = gravitational_acceleration(pos, mass, softening=eps, screening=screening)
        pull = r * factor / s**3  # per unit of the other body's mass, along +x for body 0
        expected = torch.tensor([[m1 * pull, 0, 0], [-m0 * pull, 0, 0]], dtype=torch.float64)
        torch.testing.assert_close(acceleration, expected, rtol=1e-14, atol=1e-14)


def test_screening_tends_to_newton():
    data = gravity(2, 50, seed=2)
    pos, mass = data.pos.double(), data.x[:, 0].double()
    newton = gravitational_acceleration(pos, mass, data.batch, softening=0.01)
    for screening in (math.inf, 1e12):
        screened = gravitational_acceleration(pos, mass, data.batch, softening=0.01,
                                              screening=screening)
        torch.testing.assert_close(screened, newton, rtol=1e-10, atol=1e-10)


# The batch


def test_layout_shapes_and_dtypes():
    data = gravity(4, (10, 30), seed=1)
    sizes = torch.bincount(data.batch)
    num_points = int(sizes.sum())
    assert isinstance(data, PointCloudBatch) and data.num_points == num_points
    assert data.pos.shape == (num_points, 3) and data.pos.dtype == torch.float32
    assert data.batch.shape == (num_points,) and data.batch.dtype == torch.int64
    assert data.x.shape == (num_points, 1) and data.x.dtype == torch.float32
    assert data.y.shape == (num_points, 3) and data.y.dtype == torch.float32
    assert sizes.numel() == 4 and torch.equal(data.batch, data.batch.sort().values)
    assert data.y_unit == 1.0
    for cloud in range(4):
        pos = data.pos[data.batch == cloud]
        low, high = pos.min(0).values, pos.max(0).values
        assert float(low.min()) >= 0 and float(high.max()) <= 1
        assert abs(float((high - low).max()) - 1) <= 1e-6  # longest side exactly 1
        torch.testing.assert_close((low + high) / 2, torch.full((3,), 0.5))  # centred


def test_masses_are_positive_and_sum_to_one_per_cloud():
    data = gravity(5, (2, 200), seed=4)
    mass = data.x[:, 0]
    assert bool((mass > 0).all())
    totals = torch.zeros(5, dtype=torch.float64).index_add_(0, data.batch, mass.double())
    sizes = torch.bincount(data.batch)
    assert bool(((totals - 1).abs() <= sizes * EPS32).all()), totals


def test_sizes_fixed_or_drawn_in_range():
    assert torch.bincount(gravity(3, 17).batch).tolist() == [17, 17, 17]
    sizes = torch.bincount(gravity(64, (3, 7), seed=0).batch)
    assert set(sizes.tolist()) == {3, 4, 5, 6, 7}
    assert sizes.numel() == 64


def test_same_arguments_same_batch_others_differ():
    def draw(**kwargs):
        return gravity(2, (5, 40), **{"seed": 7, **kwargs})

    first, again = draw(), draw()
    for field in ("pos", "batch", "x", "y"):
        assert torch.equal(getattr(first, field), getattr(again, field))
    others = [draw(seed=8), draw(rank=1), draw(step=1), draw(rank=1, step=1), draw(seed=6, rank=1)]
    positions = [first.pos] + [other.pos for other in others]
    for i, a in enumerate(positions):
        for b in positions[i + 1:]:
            assert a.shape != b.shape or not torch.equal(a, b)


def test_batch_is_frozen_and_moves():
    data = gravity(1, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.y = data.x
    moved = data.to("meta")
    assert isinstance(moved, PointCloudBatch) and moved.y_unit == data.y_unit
    assert {t.device.type for t in (moved.pos, moved.batch, moved.x, moved.y)} == {"meta"}
    assert data.pos.device.type == "cpu"


# Bad arguments


@pytest.mark.parametrize(("kwargs", "error", "name"), [
    ({"num_clouds": 0}, ValueError, "num_clouds"),
    ({"num_clouds": 2.0}, TypeError, "num_clouds"),
    ({"num_points": 1}, ValueError, "num_points"),
    ({"num_points": 3.0}, TypeError, "num_points"),
    ({"num_points": (1, 5)}, ValueError, "num_points"),
    ({"num_points": (6, 5)}, ValueError, "num_points"),
    ({"num_points": (2, 5, 7)}, ValueError, "num_points"),
    ({"softening": 0}, ValueError, "softening"),
    ({"softening": -0.1}, ValueError, "softening"),
    ({"softening": math.inf}, ValueError, "softening"),
    ({"softening": "0.1"}, TypeError, "softening"),
    ({"screening": 0.0}, ValueError, "screening"),
    ({"screening": -1.0}, ValueError, "screening"),
    ({"screening": math.nan}, ValueError, "screening"),
    ({"seed": -1}, ValueError, "seed"),
    ({"rank": -1}, ValueError, "rank"),
    ({"step": 0.5}, TypeError, "step"),
    ({"device": "nonsense"}, ValueError, "device"),
    ({"acceleration_unit": 0}, ValueError, "acceleration_unit"),
])
def test_bad_gravity_arguments_name_the_argument(kwargs, error, name):
    arguments = {"num_clouds": 2, "num_points": 8, **kwargs}
    with pytest.raises(error, match=name):
        gravity(arguments.pop("num_clouds"), arguments.pop("num_points"), **arguments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_names_the_device():
    with pytest.raises(ValueError, match="device cuda is not available"):
        gravity(1, 4, device="cuda")


@pytest.mark.parametrize(("change", "name"), [
    (lambda pos, mass, batch: (pos[:, None], mass, batch), "pos"),
    (lambda pos, mass, batch: (pos.long(), mass, batch), "pos"),
    (lambda pos, mass, batch: (pos, mass[:-1], batch), "mass"),
    (lambda pos, mass, batch: (pos, mass.to("meta"), batch), "mass"),
    (lambda pos, mass, batch: (pos, mass, batch.int()), "batch"),
    (lambda pos, mass, batch: (pos, mass, batch - 1), "batch"),
])
def test_bad_acceleration_inputs_name_the_argument(change, name):
    pos, mass, batch = torch.rand(6, 3), torch.rand(6), torch.tensor([0, 0, 1, 1, 1, 0])
    with pytest.raises(ValueError, match=name):
        gravitational_acceleration(*change(pos, mass, batch), softening=0.01)


# GPU


@pytest.mark.gpu
def test_gpu_draws_the_cpu_clouds_and_their_accelerations():
    cpu = gravity(3, (100, 3000), screening=0.1, seed=9)
    gpu = gravity(3, (100, 3000), screening=0.1, seed=9, device="cuda")
    for field in ("pos", "batch", "x"):
        assert torch.equal(getattr(gpu, field).cpu(), getattr(cpu, field))
    torch.testing.assert_close(gpu.y.cpu(), cpu.y, rtol=2 * EPS32, atol=1e-6)
