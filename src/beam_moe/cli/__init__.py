"""`beam-moe`: one entry point; each command lives in its own module with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from beam_moe.errors import BeamError


def command_modules() -> list[str]:
    """Every module of this package that defines `register(subparsers)` is a command."""
    return [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]


def build_parser() -> argparse.ArgumentParser:
    from beam_moe import __version__

    parser = argparse.ArgumentParser(
        prog="beam-moe",
        description="BEAM: learned binary masks that switch off Top-K experts in MoE language models.",
    )
    parser.add_argument("--version", action="version", version=f"beam-moe {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in command_modules():
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BeamError as e:
        print(f"beam-moe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"beam-moe {args.command}: interrupted", file=sys.stderr)
        return 130
