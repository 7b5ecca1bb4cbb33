#!/usr/bin/env python3
"""How effective are few-step attacks over training? ``python attack_effectiveness.py [DIR] --dataset D
--model M --checkpoints-dir RUN [--epochs-to-try 9 19 ...] [--steps-to-try 1 2 5 10 200] [--seeds 0 1 2]``.

For every ``RUN/checkpoint-<epoch>.pth.tar`` (EMA weights preferred), seed and PGD step count, one
row of clean/robust accuracy and loss goes to ``RUN/attack-effectiveness.csv`` (``--output-file``),
rewritten atomically after every row; a rerun continues where a killed run stopped. Eps
``--attack-eps`` /255, step 1.5 * eps / steps unless ``--attack-lr``; ``--run-apgd-ce`` adds
APGD-CE rows, ``--validate-standard`` checkpoint-standard.pth.tar. All validate.py data, model and
normalization flags apply (``--no-normalize`` / ``--normalize-model``). Flags: ``--help``.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from src.errors import run_cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    from src.arg_parser.evaluate import parse_effectiveness_args
    from src.effectiveness import run

    return run(parse_effectiveness_args(argv))


def _mp_entry(*_args) -> None:
    """Entry point spawned by launch_xla.py on each TPU core."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    sys.exit(run_cli(main))
