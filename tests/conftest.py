"""Shared test setup: Hypothesis profiles, slow tests and GPU skipping.

SPARSEBALL_HYPOTHESIS picks the profile: "ci" (bounded, the default) or "thorough".
Tests marked `slow` are deselected in the "ci" profile unless a `-m` expression chooses the
tests (`-m slow` runs them; bench/gpu.sh's `-m gpu` runs the slow GPU ones); "thorough" keeps
them. Tests marked `gpu` run only where CUDA is available (on the device machine: bench/gpu.sh).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=20, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = os.environ.get("SPARSEBALL_HYPOTHESIS", "ci")
settings.load_profile(PROFILE)


def pytest_collection_modifyitems(config, items):
    if PROFILE == "ci" and not config.getoption("markexpr"):
        slow = [item for item in items if "slow" in item.keywords]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if "slow" not in item.keywords]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run bench/gpu.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def nan_filled_allocations(monkeypatch):
    """Fresh float tensors from torch.empty & co. start as NaN, so that an op which leaves any
    output element unwritten fails its test instead of passing on whatever memory held."""

    def poisoned(allocate):
        def wrapper(*args, **kwargs):
            out = allocate(*args, **kwargs)
            if out.is_floating_point():
                with torch.no_grad():
                    out.fill_(float("nan"))
            return out
        return wrapper

    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, poisoned(getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned(torch.Tensor.new_empty))
