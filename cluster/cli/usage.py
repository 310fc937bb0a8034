"""What every command shares about its arguments: the usage error and the positive-integer type.

Imports nothing of the project, so every command module can take it without an import running upward.
"""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """A command-line value is wrong; printed as one line, exit status 2."""


def positive_int(text: str) -> int:
    """An argparse type: the flag's value as an integer of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
