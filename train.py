#!/usr/bin/env python3
"""(Adversarial) training of timm image classifiers: ``python train.py [DIR] -c configs/<recipe>.yaml``.

Flags and YAML keys: ``python train.py --help``. Multi-GPU: ``torchrun --nproc_per_node N train.py ...``;
TPU VMs: ``python launch_xla.py --num-devices 8 train.py ...``.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from src.errors import run_cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    from src.arg_parser import parse_args
    from src.trainer import run_training

    args, args_text = parse_args(argv)
    result = run_training(args, args_text)
    ev = result["eval"]
    if ev and result["primary"]:  # under torchrun, one process prints the result
        print(f"final eval: top1 {ev['top1']:.2f}  robust_top1 {ev['robust_top1']:.2f}  loss {ev['loss']:.4f}"
              f"  ({result['seconds']:.0f}s, outputs in {result['output_dir']})")
    return 0


def _mp_entry(*_args) -> None:
    """Entry point spawned by launch_xla.py on each TPU core."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    sys.exit(run_cli(main))
