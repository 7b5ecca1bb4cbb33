#!/usr/bin/env python3
"""Speed of timm models: ``python benchmark.py --model M --bench {inference,train,both,adv-train,all}
[--precision float32|float16|bfloat16|amp] [--channels-last] [--torch-compile] [-b N]``.

timm's benchmark (original-behaviour.md §1.7) with the project's models registered, plus
``adv-train`` (one PGD-k adversarial training step, ``--attack-steps``) and ``torch.compile``.
Prints ``--result`` + JSON; ``--results-file`` writes CSV (or JSON for ``.json``); a model
wildcard or ``--model-list`` times many models (``./benchmark.csv``). Flags: ``--help``.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from src.errors import run_cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    from src.benchmark import parse_args, run

    return run(parse_args(argv))


def _mp_entry(*_args) -> None:
    """Entry point for launch_xla.py (one process per core)."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    sys.exit(run_cli(main))
