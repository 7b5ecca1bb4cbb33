"""Plumbing every CLI shares: logging, seeding, determinism, and the device session.

The thin scripts (train.py, validate.py, ...) parse their flags, then use these helpers so that
logging format, seeding and device setup / teardown are the same everywhere.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from typing import Callable, Iterator

import numpy as np
import torch

LOGGER_NAME = "robust_vits"


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr``, not the one of the first run: in-process runs (tests,
    notebooks) that redirect stderr in between would otherwise log into a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        """logging.StreamHandler.__init__ assigns a stream; the getter above always wins."""


def setup_logging(primary: bool = True) -> None:
    """INFO on the primary process, WARNING elsewhere, so a torchrun job prints each line once."""
    level = logging.INFO if primary else logging.WARNING
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    if not logger.handlers:
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(h)
        logger.propagate = False


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32 - 1))
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> Callable[[], None]:
    """Turn on deterministic algorithms; returns a function restoring the previous settings.

    The settings are process-wide, so an in-process run (tests, notebooks) must not leave them on.
    """
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False

    def restore() -> None:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[2], prev[3]

    return restore


@contextlib.contextmanager
def device_session(**kwargs) -> Iterator["object"]:
    """Initialize the device environment (``src.bits.device.initialize_device`` kwargs), set up
    logging for this process, and always shut the environment down (process groups) at the end."""
    from src.bits.device import initialize_device, shutdown

    dev_env = initialize_device(**kwargs)
    try:
        setup_logging(dev_env.primary)
        yield dev_env
    finally:
        shutdown(dev_env)
