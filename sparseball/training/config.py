"""`Config`: every setting of a training run, its command-line options and its checks.

One dataclass is the single source of defaults: the `train` subcommand generates one option per
field (`ball_size` -> `--ball-size`), a run directory stores the resolved config as
`config.json`, and `--config FILE` starts a new run from one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparseball._checks import check_int, check_power_of_two
from sparseball.backends import BACKENDS
from sparseball.models import ATTENTIONS

TASKS = ("gravity",)
PRECISIONS = ("32", "bf16", "fp16")
FAR_FIELDS = ("flat", "tree")


class ConfigError(ValueError):
    """A setting out of range; the message names its command-line option."""


def _option(default, help: str, **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class Config:
    """A training run. The defaults train a small model on the CPU in about two minutes."""

    # The task: a fresh batch per step, a deterministic function of (seed, rank, step).
    task: str = _option("gravity", "the task (sparseball.tasks)", choices=TASKS)
    clouds: int = _option(8, "clouds per batch, on each process")
    points: int | list[int] = _option(512, "points per cloud: N, or LOW-HIGH drawn per cloud")
    softening: float = _option(0.01, "gravity: Plummer softening length")
    screening: float | None = _option(None, "gravity: Yukawa screening length (none: Newton)")
    target_unit: float = _option(100.0, "targets are divided by it (gravity's documented scale: "
                                        "|a| has median ~67, RMS ~200)")
    length_unit: float = _option(0.01, "positions are divided by it before the model, so that "
                                       "neighbours are O(1) apart (gravity: the smallest cluster "
                                       "scale)")
    # The model: ErwinNSA and its baselines.
    model: str = _option("nsa", "ErwinNSA's attention: nsa, or the ball / full baselines",
                         choices=ATTENTIONS)
    dim: int = _option(64, "width of the residual stream")
    depth: int = _option(2, "transformer blocks")
    heads: int = _option(4, "attention heads, a divisor of --dim")
    ball_size: int = _option(64, "ball size of the tree and the local attention (power of two)")
    compress_size: int = _option(16, "nsa: compressed block size")
    select_size: int = _option(32, "nsa: selected block size")
    group_size: int = _option(32, "nsa: queries sharing one selection")
    top_k: int = _option(4, "nsa: blocks selected per query group")
    far_field: str = _option("flat", "nsa: the global branches: flat (every compressed block of "
                                     "the cloud) or tree (a descent over coarser levels, "
                                     "N log N; --select-size = --compress-size)",
                             choices=FAR_FIELDS)
    fanout: int = _option(4, "nsa, --far-field tree: children per block (power of two >= 2)")
    top_blocks: int = _option(256, "nsa, --far-field tree: the most blocks per cloud at the "
                                   "top level")
    frequencies: int = _option(8, "Fourier frequencies of the position embedding (0: none)")
    message_passing: bool = _option(True, "one round of message passing between the 8 nearest "
                                           "neighbours in each 16-slot leaf before the blocks")
    activation_checkpointing: bool = _option(False, "recompute each block in the backward pass")
    backend: str = _option("auto", "sparseball backend of the attention ops",
                           choices=("auto", *BACKENDS))
    # Optimisation: AdamW, linear warmup then cosine decay to zero, gradient clipping.
    steps: int = _option(200, "optimizer steps")
    lr: float = _option(5e-3, "peak learning rate")
    warmup: float = _option(0.05, "fraction of --steps spent warming up the learning rate")
    weight_decay: float = _option(0.01, "AdamW weight decay")
    grad_clip: float = _option(1.0, "clip the gradient norm to this (0: no clipping)")
    precision: str = _option("32", "autocast dtype: 32 (none), bf16 or fp16 (CUDA, GradScaler)",
                             choices=PRECISIONS)
    compile: bool = _option(False, "torch.compile the model")
    # The run.
    seed: int = _option(0, "seed of the initial weights and of every data stream")
    device: str = _option("auto", "cpu, cuda, cuda:N or auto (under torchrun: cuda:LOCAL_RANK)",
                         metavar="DEVICE")
    log_every: int = _option(25, "steps per line of log.jsonl (train loss: mean over them)")
    eval_every: int = _option(50, "steps between evaluations (0: only at the end)")
    eval_batches: int = _option(4, "validation batches (fixed, held-out seeds)")
    save_every: int = _option(100, "steps between checkpoints (0: only at the end)")
    out: str | None = _option(None, "run directory (default: runs/<time>-<task>-<model>)",
                             metavar="DIR")

    def validate(self) -> Config:
        """Raises `ConfigError` naming the option of the first setting out of range."""
        for name in ("clouds", "dim", "depth", "heads", "top_k", "steps", "log_every",
                     "eval_batches"):
            _check(check_int, name, getattr(self, name), minimum=1)
        for name in ("frequencies", "eval_every", "save_every", "seed"):
            _check(check_int, name, getattr(self, name), minimum=0)
        _check_points(self.points)
        if self.dim % self.heads:
            raise ConfigError(f"--heads must divide --dim, got --heads {self.heads} and "
                              f"--dim {self.dim}")
        _check(check_power_of_two, "ball_size", self.ball_size)
        if self.ball_size < 2:
            raise ConfigError(f"--ball-size must be >= 2, got {self.ball_size}")
        if self.model == "nsa":
            for name in ("compress_size", "select_size", "group_size"):
                _check(check_power_of_two, name, getattr(self, name), maximum=self.ball_size,
                       maximum_name="--ball-size")
            if self.select_size < self.compress_size:
                raise ConfigError(f"--select-size must be >= --compress-size = "
                                  f"{self.compress_size}, got {self.select_size}")
            if self.far_field == "tree" and self.select_size != self.compress_size:
                raise ConfigError(f"--select-size must equal --compress-size = "
                                  f"{self.compress_size} with --far-field tree, got "
                                  f"{self.select_size}")
            _check(check_power_of_two, "fanout", self.fanout)
            if self.fanout < 2:
                raise ConfigError(f"--fanout must be >= 2, got {self.fanout}")
            _check(check_int, "top_blocks", self.top_blocks, minimum=1)
        for name in ("softening", "target_unit", "length_unit", "lr"):
            _check_positive(name, getattr(self, name))
        if self.screening is not None:
            _check_positive("screening", self.screening)
        for name in ("weight_decay", "grad_clip"):
            _check_positive(name, getattr(self, name), allow_zero=True)
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"--warmup must be in [0, 1), got {self.warmup}")
        for name, choices in (("task", TASKS), ("model", ATTENTIONS), ("precision", PRECISIONS),
                              ("far_field", FAR_FIELDS),
                              ("backend", ("auto", *BACKENDS))):
            if getattr(self, name) not in choices:
                raise ConfigError(f"--{_flag(name)} must be one of {', '.join(choices)}, "
                                  f"got {getattr(self, name)!r}")
        device = resolve_device(self.device)
        if self.precision == "fp16" and device.type != "cuda":
            raise ConfigError("--precision fp16 needs a CUDA device (its GradScaler); "
                              "use --precision bf16 on the CPU")
        return self

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Config:
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"--config {path}: cannot read it ({error})") from error
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"--config {path}: unknown settings {sorted(unknown)}")
        return cls(**values)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`--device` as a `torch.device`: "auto" is CUDA when there is one; a bare "cuda" is the
    process's own GPU under torchrun (`local_rank`)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA device here")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise ConfigError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}")
    return device


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check(check, name: str, value, **kwargs) -> None:
    """Runs one of `sparseball._checks` with the option's flag as the name."""
    try:
        check(f"--{_flag(name)}", value, **kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from error


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or value < 0 or (value == 0 and not allow_zero)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"--{_flag(name)} must be a finite number {bound}, got {value!r}")


def _check_points(points) -> None:
    if isinstance(points, (list, tuple)):
        if (len(points) != 2 or not all(isinstance(n, int) and not isinstance(n, bool)
                                        for n in points) or not 2 <= points[0] <= points[1]):
            raise ConfigError(f"--points must be N or LOW-HIGH with 2 <= LOW <= HIGH, got {points}")
        return
    _check(check_int, "points", points, minimum=2)


# The command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per `Config` field. Their defaults are suppressed, so that the parsed
    namespace holds exactly the options given (see `config_from_arguments`)."""
    for f in dataclasses.fields(Config):
        kwargs = {k: v for k, v in f.metadata.items() if k != "help"}
        if f.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _PARSERS.get(f.type, str)
            if "choices" not in kwargs:
                kwargs.setdefault("metavar", _METAVARS.get(f.type, "NAME"))
        # A None default is explained by the help text itself.
        shown = "" if f.default is None else f" (default: {_show(f.default)})"
        parser.add_argument(f"--{_flag(f.name)}", dest=f.name, default=argparse.SUPPRESS,
                            help=f.metadata["help"] + shown, **kwargs)


def config_from_arguments(args: argparse.Namespace, base: Config | None = None) -> Config:
    """The `Config` of the options given in `args` over `base` (or the defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}
    return dataclasses.replace(base or Config(), **given)


def given_options(args: argparse.Namespace) -> list[str]:
    return [f"--{_flag(f.name)}" for f in dataclasses.fields(Config) if hasattr(args, f.name)]


def parse_points(text: str) -> int | list[int]:
    try:
        if "-" in text:
            low, high = text.split("-")
            return [int(low), int(high)]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LOW-HIGH, got {text!r}") from None


def _optional_float(text: str) -> float | None:
    if text.lower() in ("none", "auto"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or none, got {text!r}") from None


_METAVARS = {"int": "N", "float": "X", "int | list[int]": "N|LOW-HIGH", "float | None": "X|none"}
_PARSERS = {"int": int, "float": float, "int | list[int]": parse_points,
            "float | None": _optional_float}


def _show(value) -> str:
    if isinstance(value, list):
        return "-".join(map(str, value))
    return "none" if value is None else str(value)
