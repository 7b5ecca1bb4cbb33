#!/usr/bin/env python3
"""RobustBench evaluation (clean + AutoAttack 'standard' accuracy) of a timm / robust-vits model.

    python validate_robustbench.py --model xcit_small_12_p16_224 --checkpoint ckpt.pth.tar \
        --dataset imagenet --data-dir ~/imagenet --eps 4 --num-classes 1000 --output report.json
    python validate_robustbench.py ... --dataset tfds/robustbench_image_net --data-dir ~/tensorflow_datasets

Reimplements RobustBench's ``benchmark()`` protocol (same data, example order, 5000 ImageNet ids,
preprocessing, AutoAttack standard, model_info JSON fields) without the ``robustbench`` package;
see ``src/robustbench.py``. Beyond it: resumable after a kill (per-chunk state next to the
report) and shardable over processes with an exact merge:

    torchrun --nproc_per_node 8 validate_robustbench.py ...            # one shard per process
    python validate_robustbench.py ... --num-shards 4 --shard-id 2      # shards as separate jobs
    python validate_robustbench.py ... --num-shards 4 --merge-only      # merge them into the report
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from src.arg_parser.evaluate import build_robustbench_parser as build_parser  # noqa: F401 (tests, user code)
from src.errors import run_cli


def _run(argv: Optional[Sequence[str]] = None) -> int:
    from src.arg_parser.evaluate import parse_robustbench_args
    from src.cli import setup_logging
    from src.robustbench import run

    args = parse_robustbench_args(argv)
    setup_logging(True)
    report = run(args)
    if report is not None:
        print(f"clean_acc {report['clean_acc']}  autoattack_acc {report['autoattack_acc']}  "
              f"({report['dataset']}, {report['threat_model']} eps {report['eps']}, {report['n_examples']} examples)"
              f"  report: {args.output}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; bad input prints one ``error:`` line and returns 2."""
    return run_cli(_run, argv)


def _mp_entry(*_args) -> None:
    """Entry point spawned by launch_xla.py on each TPU core."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
