"""`beam-moe COMMAND --help` states every option's default."""

from __future__ import annotations

import argparse

from beam_moe.cli import build_parser


def parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """`parser` and every (nested) command under it."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += parsers(sub)
    return found


def test_every_option_with_a_default_shows_it_in_help():
    missing = []
    for parser in parsers(build_parser()):
        text = "".join(parser.format_help().split())  # wrapping breaks lines at spaces and hyphens
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or action.default in (None, "", []):
                continue
            if action.default is argparse.SUPPRESS:
                continue
            shown = action.help % {**vars(action), "prog": parser.prog} if action.help else ""
            if str(action.default) not in shown or "".join(shown.split()) not in text:
                missing.append(f"{parser.prog} {action.option_strings[0]} (default {action.default!r})")
    assert not missing, "--help does not show these defaults:\n" + "\n".join(missing)
