#!/usr/bin/env python3
"""Clean and adversarial evaluation: ``python validate.py [DIR] --model M --checkpoint C --attack pgd ...``.

``--attack`` pgd / targeted_pgd / apgd-ce / autoattack with ``--attack-eps`` (and ``--attack-lr``) in
/255 units; several ``--attack-steps`` values give one result row each (what validate_pgd.py did);
``--checkpoint DIR`` or a model wildcard evaluates many (bulk mode, results-all.csv in that DIR). Results print as
``--result`` + JSON, preceded by ``WARNING:`` lines when the numbers cannot be trusted. Flags:
``python validate.py --help``. Multi-GPU: ``torchrun --nproc_per_node N validate.py ...``.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from src.errors import run_cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    from src.arg_parser.evaluate import parse_validate_args
    from src.validation import run

    return run(parse_validate_args(argv))


def _mp_entry(*_args) -> None:
    """Entry point spawned by launch_xla.py on each TPU core."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    sys.exit(run_cli(main))
