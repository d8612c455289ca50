"""`beam-moe`: one entry point; each command lives in its own module with `register(subparsers)`.

Errors: a BeamError (bad input) prints its message and exits 2; any other exception prints one
line naming it and exits 1. `--debug` (before or after the command) prints the traceback too.

Threads: OpenMP's wait policy is set before torch is imported and torch uses the cores other
processes leave free, unless `--threads N` (beam_moe/threads.py says why).

Ctrl-C exits 130; a command that can continue later sets `on_interrupt(args, argv)`, which says how.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import shlex
import sys
import traceback
import warnings

from beam_moe import threads
from beam_moe.errors import BeamError, BeamWarning

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_INTERRUPTED = 130


def command_modules() -> list[str]:
    """Every module of this package that defines `register(subparsers)` is a command."""
    return [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]


def _add_debug(parser: argparse.ArgumentParser, default: object) -> None:
    """`--debug` on `parser` and every (nested) command under it, so it works in any position."""
    parser.add_argument(
        "--debug", action="store_true", default=default, help="show the full traceback of an error"
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_debug(sub, argparse.SUPPRESS)


def _add_threads(parser: argparse.ArgumentParser) -> None:
    """`--threads` on every command, except one whose engine places its own threads (`serve`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_threads(sub)
            return
    if not parser.get_default("engine_threads"):
        parser.add_argument(
            "--threads",
            type=int,
            default=None,
            metavar="N",
            help="torch CPU threads (default: the cores other processes leave free; training and evaluation look again as they run)",
        )


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """End every option's help on `parser` and the commands under it with its default.

    Skipped where there is none to show (flags, None, empty) or the help already states it.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _show_defaults(sub)
            continue
        text = action.help or ""
        if (
            not action.option_strings
            or action.nargs == 0
            or action.default in (None, "", [], argparse.SUPPRESS)
            or "default" in text
            or f"({action.default})" in text
        ):
            continue
        action.help = f"{text} (default: %(default)s)" if text else "default: %(default)s"


def build_parser() -> argparse.ArgumentParser:
    from beam_moe.version import __version__

    parser = argparse.ArgumentParser(
        prog="beam-moe",
        description="BEAM: learned binary masks that switch off Top-K experts in MoE language models.",
    )
    parser.add_argument("--version", action="version", version=f"beam-moe {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in command_modules():
        importlib.import_module(module).register(subparsers)
    _add_debug(parser, False)
    _add_threads(parser)
    _show_defaults(parser)
    return parser


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] + (" ..." if len(lines) > 1 else "") if lines else "(no message)"


def main(argv: list[str] | None = None) -> int:
    threads.prepare_environment()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["beam-moe", *argv])  # result files record what produced them
    where = f"beam-moe {args.command}"
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, BeamWarning):
            print(f"{where}: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", BeamWarning)
            warnings.showwarning = show
            if getattr(args, "threads", None) is not None and args.threads < 1:
                raise BeamError(f"--threads must be at least 1, got {args.threads}")
            if getattr(args, "engine_threads", False):
                threads.leave_to_the_engine()
            else:
                threads.govern(args.threads)
            return int(args.func(args) or 0)
    except BeamError as e:
        if args.debug:
            traceback.print_exc()
        print(f"{where}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        hint = args.on_interrupt(args, argv) if getattr(args, "on_interrupt", None) else None
        print(f"{where}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if args.debug:
            traceback.print_exc()
            print(f"{where}: error: unexpected {type(e).__name__} (traceback above)", file=sys.stderr)
        else:
            print(
                f"{where}: error: unexpected {type(e).__name__}: {_first_line(e)} "
                "(rerun with --debug for the traceback)",
                file=sys.stderr,
            )
        return EXIT_INTERNAL_ERROR
    finally:
        threads.release()
