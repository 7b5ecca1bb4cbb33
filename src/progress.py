"""Progress of long work: a tqdm bar on a terminal, periodic log lines otherwise, one process only.

Every evaluation and attack reports through :class:`Progress`: how much is done, images/s and an
ETA. On a TTY it is a bar (tqdm computes the rate and the remaining time itself); in a log file
or a CI job it is a line on the ``robust_vits`` logger whenever ``log_every`` steps or
``log_seconds`` seconds have passed, so an hour-long AutoAttack run is never silent. Under
torchrun only the primary process (rank 0) shows anything: the others would print the same
progress N times.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Tuple, Union

_logger = logging.getLogger("robust_vits")

LOG_SECONDS = 20.0  # a log line at least this often while work is going on (non-TTY)

__all__ = ["LOG_SECONDS", "Progress", "format_eta", "is_primary_process", "stderr_is_tty", "track_ranges"]


def is_primary_process() -> bool:
    """Rank 0 of a torch.distributed job (or of a torchrun/launcher environment), else True."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    rank = os.environ.get("RANK")
    return rank is None or rank.strip() in ("", "0")


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def format_eta(seconds: float) -> str:
    """``h:mm:ss`` (or ``?`` while nothing is known)."""
    if not seconds == seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """``total`` steps of work (batches, chunks, attack runs) processing ``images`` along the way.

    ``update(steps, images, status)`` after each step; ``note(status)`` between steps (a line on a
    non-TTY only when one is due, or always with ``force``). A line is due every ``log_every`` steps
    and every ``log_seconds`` seconds (default :data:`LOG_SECONDS`; None: steps only).
    ``primary=None`` asks :func:`is_primary_process`. ``world_size`` scales the images/s of one process to the job's.
    """

    def __init__(self, total: int, desc: str, *, primary: Optional[bool] = None, unit: str = "batch",
                 log_every: int = 0, log_seconds: Any = ..., world_size: int = 1, done: int = 0):
        self.total, self.desc, self.unit = int(total or 0), desc, unit
        self.enabled = is_primary_process() if primary is None else bool(primary)
        if log_seconds is ...:
            log_seconds = LOG_SECONDS
        self.log_every, self.log_seconds, self.world_size = log_every, log_seconds, max(1, world_size)
        self.done, self.images, self.status = done, 0, ""
        self.t_start = self.t_line = time.time()
        self._start_done = done
        self.bar = None
        if self.enabled and stderr_is_tty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total or None, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                            initial=done)

    # -- what is shown --------------------------------------------------------------------------
    def rate(self) -> float:
        """Images per second of the whole job since the start."""
        return self.images * self.world_size / max(time.time() - self.t_start, 1e-9)

    def rate_text(self) -> str:
        """``12.3 img/s``, or ``4.2 s/img`` for slow work (attacks), where img/s would read 0.0."""
        r = self.rate()
        return f"{r:.1f} img/s" if r >= 1 or r <= 0 else f"{1 / r:.1f} s/img"

    def eta(self) -> float:
        steps = self.done - self._start_done
        if not self.total or steps <= 0:
            return float("nan")
        return (time.time() - self.t_start) / steps * max(self.total - self.done, 0)

    def line(self) -> str:
        of = f"/{self.total}" if self.total else ""
        parts = [f"{self.desc} [{self.done}{of}]"]
        if self.images:
            parts.append(self.rate_text())
        if self.total:
            parts.append(f"ETA {format_eta(self.eta())}")
        text = ", ".join(parts)
        return f"{text} | {self.status}" if self.status else text

    # -- reporting ------------------------------------------------------------------------------
    def _due(self) -> bool:
        if self.log_every and self.done and self.done % self.log_every == 0:
            return True
        return self.log_seconds is not None and time.time() - self.t_line >= self.log_seconds

    def _emit(self, force: bool) -> None:
        if not self.enabled:
            return
        show = self.bar is not None or force or self._due()
        if callable(self.status):
            if not show:
                return
            self.status = self.status()  # computed only when shown (it may sync the device)
        if self.bar is not None:
            postfix = self.rate_text() if self.images else ""
            self.bar.set_postfix_str(" ".join(p for p in (postfix, self.status) if p), refresh=True)
            return
        if show:
            _logger.info("%s", self.line())
            self.t_line = time.time()

    def update(self, steps: int = 1, images: int = 0, status: Union[None, str, Callable[[], str]] = None,
               force: bool = False) -> None:
        """``status`` may be a function: it is called only when a line or the bar shows it."""
        self.done += steps
        self.images += images
        if status is not None:
            self.status = status
        if self.bar is not None and self.enabled:
            self.bar.update(steps)
        self._emit(force or (bool(self.total) and self.done >= self.total and bool(self.log_every)))

    def note(self, status: str, force: bool = False) -> None:
        self.status = status
        self._emit(force)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track_ranges(ranges: Iterable[Tuple[int, int]], desc: str, primary: Optional[bool] = None,
                 log_seconds: float = 0.0) -> Iterator[Tuple[int, int]]:
    """Yield ``(start, end)`` example ranges (chunks), reporting after each one: chunks done, images/s
    and the ETA of the remaining chunks. By default a line per chunk (chunks are long)."""
    ranges = list(ranges)
    with Progress(len(ranges), desc, primary=primary, unit="chunk", log_seconds=log_seconds) as progress:
        for start, end in ranges:
            yield start, end
            progress.update(1, images=end - start, force=True)
