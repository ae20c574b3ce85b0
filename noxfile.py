"""Sessions: `nox -s test` (CPU suite), `nox -s demo` (the main job), `nox -s lint`,
`nox -s docs` (the documentation site, strict), `nox -s package` (build the sdist and wheel,
install the wheel into a fresh venv and run it from outside the checkout), and `nox -s gpu` (the
GPU suite and benchmarks on a CUDA machine, with what is installed there)."""

from __future__ import annotations

import os
import pathlib
import shutil
import tarfile
import tempfile
import zipfile

import nox

nox.options.sessions = ["lint", "test", "package", "docs"]
nox.options.default_venv_backend = "venv"

# A CPU build: an unpinned torch resolves to a CUDA build of several GB.
TORCH = "torch==2.13.0"


def _install(session: nox.Session, extras: str) -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]" if extras else ".")


@nox.session
def test(session: nox.Session) -> None:
    """The CPU test suite (Hypothesis profile from $SPARSEBALL_HYPOTHESIS, "ci" by default,
    which deselects the tests marked slow; "thorough" runs them)."""
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


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site: `mkdocs build --strict` into the ignored site/. docs/hooks.py
    imports sparseball (the backend table), hence torch and the package in the session."""
    _install(session, "docs")
    session.env["NO_MKDOCS_2_WARNING"] = "1"  # Material's banner about MkDocs 2, not about us
    session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """GPU tests and benchmarks with the machine's own torch/triton/cupy (no installs, no
    internet): the same as `bash bench/gpu.sh`. Results land in $OUT or ./out."""
    session.run("bash", "bench/gpu.sh", *session.posargs, external=True)


ROOT = pathlib.Path(__file__).resolve().parent

# Run by the installed copy, from outside the checkout: it must be the one imported, know its
# version, leave `reference` (the tests' oracle) behind, and find the CUDA sources that CuPy
# compiles (the tree builder's, the attention backend's), without CuPy.
CHECK_INSTALLED = """
import importlib.metadata, importlib.util, pathlib, sys, sysconfig
import sparseball
from sparseball.tree import cupy_builder
site = pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()
assert pathlib.Path(sparseball.__file__).resolve().is_relative_to(site), sparseball.__file__
assert importlib.metadata.version("sparseball") == sparseball.__version__
assert importlib.util.find_spec("reference") is None, "a top-level `reference` is installed"
assert cupy_builder.KERNEL_FILE.is_file(), cupy_builder.KERNEL_FILE
assert "sb_subtree" in cupy_builder.cuda_sources()["balltree.cu"]
from sparseball.backends.cupy import ops as cupy_ops, source as cupy_source
assert cupy_source.KERNEL_FILE.is_file(), cupy_source.KERNEL_FILE
assert "sb_select_blocks" in cupy_source.KERNEL_FILE.read_text()
assert "cupy" not in sys.modules
print("installed:", sparseball.__version__, "at", pathlib.Path(sparseball.__file__).parent)
"""


def _archive_problems(names: list[str], root: str, required: set[str], allowed: set[str]) -> list[str]:
    """What is wrong with an archive of entries `names` (paths under the folder `root`, "" for
    a wheel): paths of `required` it lacks, top-level entries outside `allowed`."""
    paths = {name.removeprefix(f"{root}/") for name in names if name != root} if root else set(names)
    missing = [f"missing {path}" for path in sorted(required - paths)]
    unexpected = [f"unexpected {top}" for top in sorted({path.split("/")[0] for path in paths} - allowed)]
    return missing + unexpected


@nox.session
def package(session: nox.Session) -> None:
    """Build the sdist and, from it, the wheel; check what they hold; install the wheel into a
    fresh venv and run `python -m sparseball demo --quick` there from a temporary directory."""
    session.install("build")
    kernel_sources = {path.relative_to(ROOT).as_posix() for path in (ROOT / "sparseball").rglob("*.cu")}
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="sparseball-package-"))
    try:
        # Built from a copy of the files git tracks (or would), so nothing ignored or left over
        # from an earlier build (build/, *.egg-info) reaches the package or the checkout.
        source = tmp / "source"
        files = session.run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                            external=True, silent=True)
        for name in files.split("\0"):
            if name and (ROOT / name).is_file():
                (source / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, source / name)
        dist = tmp / "dist"
        session.run("python", "-m", "build", "-q", "--outdir", str(dist), str(source))
        (sdist,), (wheel,) = dist.glob("*.tar.gz"), dist.glob("*.whl")
        with tarfile.open(sdist) as archive:
            problems = _archive_problems(
                archive.getnames(), sdist.name.removesuffix(".tar.gz"),
                kernel_sources | {"LICENSE", "tests/conftest.py", "reference/ops.py"},
                {"sparseball", "sparseball.egg-info", "tests", "reference", "LICENSE", "README.md",
                 "PKG-INFO", "pyproject.toml", "setup.cfg", "MANIFEST.in"})
        dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
        with zipfile.ZipFile(wheel) as archive:
            problems += _archive_problems(archive.namelist(), "",
                                          kernel_sources | {f"{dist_info}/licenses/LICENSE"},
                                          {"sparseball", dist_info})
        if problems:
            session.error(f"{sdist.name}, {wheel.name}: " + "; ".join(problems))
        session.log(f"{sdist.name} and {wheel.name} hold {', '.join(sorted(kernel_sources))} and the "
                    "LICENSE; the wheel installs sparseball alone (no tests, no reference/)")

        venv = tmp / "venv"
        session.run("python", "-m", "venv", str(venv))
        python = str(venv / "bin" / "python")
        # TORCH beside the wheel keeps pip on the CPU build. --no-compile: byte-compiling all
        # of torch at install took longer than the rest of the install.
        session.run(python, "-m", "pip", "install", "--quiet", "--no-compile", TORCH, str(wheel),
                    external=True)
        work = tmp / "work"
        work.mkdir()
        session.chdir(work)
        # -I: neither the working directory nor $PYTHONPATH goes on sys.path.
        session.run(python, "-I", "-c", CHECK_INSTALLED, external=True)
        session.run(python, "-I", "-m", "sparseball", "demo", "--quick", external=True)
    finally:
        session.chdir(ROOT)
        shutil.rmtree(tmp, ignore_errors=True)
