"""argparse helpers for every entry point: numeric types whose out-of-range values are argparse's
one-line error, and the help formatter."""

from __future__ import annotations

import argparse


def at_least(low: int, meaning: str = ""):
    """An int type that refuses values below `low`; `meaning` explains the lowest value (e.g. "0 = all")."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}{f' ({meaning})' if meaning else ''}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in the help, except where there is none to show (a required flag, or
    one whose absence means something its help already says)."""

    def _get_help_string(self, action):
        if action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)
