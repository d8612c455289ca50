"""`python -m beam_moe.native build`: compile beam-moe's native op for this machine (the set-up command runs it)."""

from __future__ import annotations

import argparse
import sys

from beam_moe.errors import BeamError
from beam_moe.native import build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m beam_moe.native", description=__doc__)
    parser.add_argument("command", choices=["build"], help="build: compile the op (a no-op when up to date)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)
    try:
        path = build(verbose=args.verbose)
    except BeamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"beam-moe native op: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
