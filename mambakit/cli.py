"""Command line: `mambakit demo` (more subcommands arrive with training and generation)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mambakit", description="The Mamba family of sequence models.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run every op on random data, check the algorithms agree, time the CPU path")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(seed=args.seed)


if __name__ == "__main__":
    main()
