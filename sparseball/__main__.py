"""Command line: `python -m sparseball {demo,train,eval}`.

`train` runs on every process torchrun starts (`torchrun --nproc_per_node=N -m sparseball
train ...`: DistributedDataParallel, rank 0 logs and saves).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sparseball")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="trees, attention on every backend, and a short "
                                            "training run beside its ball-only baseline")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true",
                      help="one small batch in one dtype per device: checks that an install works")
    for subparser in (_train_parser(commands), _eval_parser(commands)):
        subparser.set_defaults(subparser=subparser)  # whose usage an error prints
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import main as run_demo

        run_demo(seed=args.seed, quick=args.quick)
        return
    from .training import ConfigError

    try:
        if args.command == "train":
            _train(args)
        else:
            from .training import evaluate_run

            evaluate_run(args.run, batches=args.batches, clouds=args.clouds, points=args.points,
                         device=args.device, progress=args.progress)
    except ConfigError as error:
        args.subparser.error(str(error))


def _train_parser(commands) -> argparse.ArgumentParser:
    from .training.config import add_arguments

    parser = commands.add_parser(
        "train", help="train a model on a task: a run directory with config, log, checkpoint",
        description="Train ErwinNSA (or a baseline) on a task. With no options: a small model "
                    "on the CPU in about two minutes. Every option has a default; the run "
                    "directory records the resolved config.json.")
    parser.add_argument("--config", metavar="FILE",
                        help="start a new run from this config.json (options given override it; "
                             "its --out is not reused)")
    parser.add_argument("--resume", metavar="RUN",
                        help="continue RUN exactly from its checkpoint.pt, with its config.json")
    parser.add_argument("--stop-after", type=int, metavar="STEP",
                        help="end this invocation after STEP, as if stopped there (continue it "
                             "with --resume)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show a progress bar")
    add_arguments(parser.add_argument_group("run settings (recorded in config.json)"))
    return parser


def _eval_parser(commands) -> argparse.ArgumentParser:
    from .training.config import parse_points

    parser = commands.add_parser(
        "eval", help="test metrics of a run on fresh clouds (held-out seeds) -> RUN/eval.json")
    parser.add_argument("run", metavar="RUN", help="a run directory of `train`")
    parser.add_argument("--batches", type=int, default=8, help="test batches (default: 8)")
    parser.add_argument("--clouds", type=int, help="clouds per batch (default: the run's)")
    parser.add_argument("--points", type=parse_points, metavar="POINTS",
                        help="points per cloud, N or LOW-HIGH (default: the run's)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the run's)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show a progress bar")
    return parser


def _train(args: argparse.Namespace) -> None:
    from .training import Config, ConfigError, train
    from .training.checkpoint import CHECKPOINT
    from .training.config import config_from_arguments, given_options
    from .training.loop import CONFIG

    if args.stop_after is not None and args.stop_after < 1:
        raise ConfigError(f"--stop-after must be >= 1, got {args.stop_after}")
    if args.resume:
        run = Path(args.resume)
        if args.config:
            raise ConfigError("--resume continues a run with its own config.json: drop --config")
        given = given_options(args)
        if given:
            raise ConfigError(f"--resume {run} continues the run with its own config.json, so "
                              f"{', '.join(given)} cannot change; start a new run with "
                              f"--config {run / CONFIG} instead")
        for needed in (CHECKPOINT, CONFIG):
            if not (run / needed).exists():
                raise ConfigError(f"--resume {run}: no {needed} in {run}")
        cfg = dataclasses.replace(Config.load(run / CONFIG), out=str(run))
    elif args.config:
        base = dataclasses.replace(Config.load(Path(args.config)), out=None)
        cfg = config_from_arguments(args, base)
    else:
        cfg = config_from_arguments(args)
    train(cfg, resume=bool(args.resume), stop_after=args.stop_after, progress=args.progress)


if __name__ == "__main__":
    main()
