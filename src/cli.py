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


def rng_state() -> dict:
    """The state of the random number generators ``seed_everything`` seeds (Python, NumPy, torch's CPU
    generator and, once initialized, the current CUDA device's), as a checkpoint can hold it (tensors,
    lists and numbers only: ``torch.load(weights_only=True)`` reads it back)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Put back what ``rng_state`` returned (a CUDA state only where CUDA is in use)."""
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((int(py_version), tuple(int(v) for v in py_internal), py_gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(name), np.asarray(key, dtype=np.int64).astype(np.uint32), int(pos), int(has_gauss),
                         float(cached)))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


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
