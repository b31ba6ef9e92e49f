"""argparse types for the scripts' numeric flags: a value out of range is argparse's one-line error."""

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
