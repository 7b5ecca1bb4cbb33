"""Expected errors and the CLI wrapper that turns them into one clear line and exit code 2.

Anything a user can cause with bad input (flags, configs, paths, checkpoints, datasets) raises a
``UsageError`` (or one of the project's error classes registered in ``EXPECTED``) with a message
that names the problem and how to fix it. ``run_cli`` prints ``error: <message>`` on stderr and
exits with code 2, without a traceback; unexpected exceptions keep their traceback.
"""
from __future__ import annotations

import sys
from typing import Callable, List, Optional, Sequence, Tuple, Type


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


EXIT_USAGE = 2

_expected: List[Type[BaseException]] = [UsageError]


def register_expected(*classes: Type[BaseException]) -> None:
    """Mark exception classes defined elsewhere (e.g. checkpoint errors) as expected user errors."""
    for c in classes:
        if c not in _expected:
            _expected.append(c)


def expected_errors() -> Tuple[Type[BaseException], ...]:
    return tuple(_expected)


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)``; expected errors become ``error: ...`` on stderr and exit code 2."""
    try:
        return int(main(argv) or 0)
    except expected_errors() as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_USAGE
