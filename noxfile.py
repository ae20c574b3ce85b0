"""Sessions: `nox -s test` (CPU suite), `nox -s demo` (the main job), `nox -s lint`, and
`nox -s gpu` (the GPU suite and benchmarks on a CUDA machine, with what is installed there)."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "test"]
nox.options.default_venv_backend = "venv"

# A CPU build: an unpinned torch resolves to a CUDA build of several GB.
TORCH = "torch==2.13.0"


def _install(session: nox.Session, extras: str) -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]" if extras else ".")


@nox.session
def test(session: nox.Session) -> None:
    """The CPU test suite (Hypothesis profile from $SPARSEBALL_HYPOTHESIS, "ci" by default)."""
    _install(session, "test,triton")
    session.env.setdefault("SPARSEBALL_HYPOTHESIS", os.environ.get("SPARSEBALL_HYPOTHESIS", "ci"))
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: build trees, run every available backend on a synthetic batch, then train
    ErwinNSA beside its ball-only baseline for a minute."""
    _install(session, "")
    session.run("python", "-m", "sparseball", "demo", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """GPU tests and benchmarks with the machine's own torch/triton/cupy (no installs, no
    internet): the same as `bash bench/gpu.sh`. Results land in $OUT or ./out."""
    session.run("bash", "bench/gpu.sh", *session.posargs, external=True)
