#!/usr/bin/env python3
"""How does PGD converge on single examples? ``python attack_convergence.py [DIR] --dataset D --model M
--checkpoint C [--n-points 100] [--runs 20] [--steps-to-try 0 1 2 5 10 50 100 200 500]``.

On the first ``--n-points`` correctly classified examples, each of ``--runs`` random restarts
records the per-example cross-entropy after every step count; CSV ``point, seed, steps, loss`` at
``--output-file`` (default ``./<model>.csv``), resumable from ``<output>.state/``. Step size
1.5 * eps / ``--attack-steps`` for every step count (the original's), or 1.5 * eps / k with
``--tie-step-size``; ``--one-instance`` records every iteration. All validate.py data, model and
normalization flags apply. Plots: ``python -m src.plots convergence CSV --out DIR``. Flags: ``--help``.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from src.errors import run_cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    from src.convergence import parse_args, run

    return run(parse_args(argv))


def _mp_entry(*_args) -> None:
    """Entry point spawned by launch_xla.py on each TPU core."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    sys.exit(run_cli(main))
