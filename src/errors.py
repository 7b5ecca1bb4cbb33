"""Expected errors and the CLI wrapper that turns them into one clear line and exit code 2.

Anything a user can cause with bad input (flags, configs, paths, checkpoints, datasets) raises a
subclass of ``ExpectedError`` with a message that names the problem and how to fix it. ``run_cli``
prints ``error: <message>`` on stderr and exits with code 2, without a traceback; unexpected
exceptions keep their traceback. Which errors are expected is decided by the class hierarchy alone,
never by which modules happen to be imported.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable, Iterator, Optional, Sequence

EXIT_USAGE = 2


class ExpectedError(Exception):
    """Base of every error a user can cause: printed as one line, exit code 2."""


class UsageError(ExpectedError):
    """Bad flags, config values, paths or data."""


class SourceDataError(ExpectedError, ValueError):
    """A dataset builder's source files (``--manual_dir``) are damaged or hold the wrong data: one line naming
    the file, before anything is written (``datasets/build.py``)."""


class CheckpointError(ExpectedError, RuntimeError):
    """A checkpoint cannot be read or does not fit the model; the message is one clear line."""


class UntrustedCheckpointError(CheckpointError):
    """The file needs arbitrary (code-running) unpickling and the caller did not trust it."""


class FinetuneArgumentError(ExpectedError, ValueError):
    """Fine-tuning options that cannot work (no class count, a patch size the model cannot take)."""


class NonFiniteLossError(ExpectedError, RuntimeError):
    """The loss or the gradients became NaN/inf: training stops, the last good checkpoint stays."""


class Interrupted(Exception):
    """The run was stopped by a signal (Ctrl-C, SIGTERM): one line, exit code 128 + the signal number
    (130 / 143), so ``train.py && validate.py`` pipelines stop instead of going on with a half-done run."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, or its class name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (the pre-emption notice of cloud machines) raises ``Interrupted`` like Ctrl-C raises
    KeyboardInterrupt, so ``finally`` blocks run and the CLI says what happened (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise Interrupted("terminated (SIGTERM)", signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)``; expected errors become ``error: ...`` on stderr and exit code 2, signals
    ``interrupted: ...`` and exit code 130 (Ctrl-C) or 143 (SIGTERM), never a traceback."""
    try:
        with sigterm_as_interrupt():
            return int(main(argv) or 0)
    except ExpectedError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as e:
        print(f"interrupted: {first_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: stopped by Ctrl-C (SIGINT)", file=sys.stderr)
        return 128 + signal.SIGINT
