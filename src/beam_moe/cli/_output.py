"""`--output`/`-o` and `--overwrite`: the same two options on every command that writes a result."""

from __future__ import annotations

import argparse

from beam_moe.outputs import OVERWRITE_HELP


def add_output_arguments(
    parser: argparse.ArgumentParser,
    help: str,
    *,
    metavar: str = "DIR",
    required: bool = True,
    default: str | None = None,
    overwrite_help: str = OVERWRITE_HELP,
) -> None:
    """The rule the two options follow lives in `beam_moe.outputs`."""
    parser.add_argument("--output", "-o", required=required, default=default, metavar=metavar, help=help)
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
