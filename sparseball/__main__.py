"""Command line: `python -m sparseball demo`."""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sparseball")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="trees and attention on a synthetic batch, every backend")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true",
                      help="one small batch in one dtype per device: checks that an install works")
    args = parser.parse_args()
    if args.command == "demo":
        from .demo import main as run_demo

        run_demo(seed=args.seed, quick=args.quick)


if __name__ == "__main__":
    main()
