"""What every benchmark result says about its run, from one place: `run_record()` for the JSON
files (merged into each script's record) and `run_line()` for the markdown ones.

The code measured is the sparseball package the process imported: the git commit it comes
from and whether the tree differed from that commit ("dirty", with the changed paths). That
comes from a COMMIT stamp whose code digest matches (see below), else from git where the
package sits at the top of a git work tree, else from a COMMIT file
beside the package: bench/make_base.sh writes one for bench/base/ (an archive of the commit,
so clean), and `python3 bench/_meta.py stamp` writes one at the repository root for a copy of
the working tree without .git (the device machine: carry COMMIT with the tree). A stamp holds
a digest of the code too, so that a stamp older than the code shows ("stamp_matches": false).
Without either the commit is "unknown".

    python3 bench/_meta.py stamp    # before copying the tree to a machine without .git

Importing this module imports neither torch nor sparseball (`stamp` runs with any python3).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import importlib.util
import json
import pathlib
import platform
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _git(root: pathlib.Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          check=True, timeout=60).stdout


def _git_state(root: pathlib.Path) -> dict | None:
    """Commit and changes of the git work tree whose top is `root`, or None (no git, no work
    tree, or `root` inside another tree's folder, as bench/base/ is)."""
    try:
        top = pathlib.Path(_git(root, "rev-parse", "--show-toplevel").strip())
        if top.resolve() != root.resolve():
            return None
        changed = _git(root, "status", "--porcelain").splitlines()
        return {"commit": _git(root, "rev-parse", "HEAD").strip(), "dirty": bool(changed),
                "changed": changed[:50]}
    except (OSError, subprocess.SubprocessError):
        return None


def code_digest(root: pathlib.Path) -> str:
    """sha256 of the measured code under `root`: sparseball/ (.py, .cu) and bench/ (.py, .sh,
    not bench/base/ or results), paths and contents."""
    files = [p for p in (root / "sparseball").rglob("*") if p.suffix in (".py", ".cu")]
    files += [p for p in (root / "bench").glob("*") if p.suffix in (".py", ".sh")]
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def stamp(root: pathlib.Path = ROOT) -> dict:
    """Write root/COMMIT (ignored by git): the work tree's commit, its changes and the code's
    digest, for `code_measured` on a copy of the tree without .git."""
    state = _git_state(root)
    if state is None:
        raise SystemExit(f"{root} is not the top of a git work tree: nothing to stamp")
    record = {**state, "digest": code_digest(root),
              "stamped": datetime.datetime.now().isoformat(timespec="seconds")}
    (root / "COMMIT").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _stamp_matches(stamp_file: pathlib.Path, root: pathlib.Path) -> bool:
    text = stamp_file.read_text().strip()
    return text.startswith("{") and json.loads(text).get("digest") == code_digest(root)


def code_measured() -> dict:
    """The sparseball package this process imported: its folder, commit and changes (see the
    module's docstring for where they come from)."""
    spec = importlib.util.find_spec("sparseball")
    if spec is None or spec.origin is None:
        return {"path": None, "commit": "unknown", "source": "sparseball not importable"}
    package = pathlib.Path(spec.origin).resolve().parent
    root = package.parent
    stamp_file = root / "COMMIT"
    state = _git_state(root)
    # A stamp whose digest matches the code wins over git: the device machine's copy of the
    # tree carries a .git of the checkout's first commit, not of the commit measured.
    if state is not None and not (stamp_file.exists() and _stamp_matches(stamp_file, root)):
        return {"path": str(package), **state, "source": "git"}
    if stamp_file.exists():
        text = stamp_file.read_text().strip()
        if text.startswith("{"):
            record = json.loads(text)
            return {"path": str(package), "commit": record["commit"], "dirty": record["dirty"],
                    "changed": record.get("changed", []), "source": f"{stamp_file} (stamped "
                    f"{record.get('stamped')})",
                    "stamp_matches": record.get("digest") == code_digest(root)}
        # bench/make_base.sh: the bare commit its archive came from.
        return {"path": str(package), "commit": text.split()[0], "dirty": False,
                "source": f"{stamp_file} (an archive of the commit)"}
    return {"path": str(package), "commit": "unknown", "dirty": None,
            "source": "no git work tree and no COMMIT file (python3 bench/_meta.py stamp)"}


def run_record() -> dict:
    """The fields every benchmark JSON starts with: the code measured, the GPU (None without
    CUDA), the date and the versions."""
    import torch

    record = {
        "code": code_measured(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    if importlib.util.find_spec("triton") is not None:
        record["triton"] = importlib.import_module("triton").__version__
    return record


def run_line(record: dict) -> str:
    """One markdown line naming what a result measured, from `run_record()`'s fields."""
    code = record["code"]
    state = {True: ", dirty", False: "", None: ""}[code.get("dirty")]
    if code.get("stamp_matches") is False:
        state += ", code changed since its stamp"
    return (f"sparseball {code['commit'][:12]}{state}; {record['gpu'] or 'no GPU'}; "
            f"{record['date']}; torch {record['torch']}"
            + (f", triton {record['triton']}" if "triton" in record else ""))


if __name__ == "__main__":
    if sys.argv[1:] == ["stamp"]:
        print(json.dumps(stamp(), indent=2))
    else:
        raise SystemExit("usage: python3 bench/_meta.py stamp")
