#!/usr/bin/env python3
"""Export a training checkpoint, or convert a downloaded original release, into a self-describing one.

    python util_scripts/prepare_checkpoint.py --checkpoint gs://bucket/run/best.pth.tar \\
        --model xcit_small_12_p4_32 --dataset cifar10 --eps 8 --output-dir released/

writes ``released/xcit_small_12_p4_32-cifar10-eps-8.pth.tar`` (the bare unwrapped state dict:
the original's release format, loadable by timm and RobustBench-style code) and a
``.safetensors`` twin. Both record what evaluating them needs (model, classes, patch size, input
size, crop, interpolation, normalization mode and mean/std: ``src.eval_config``), so
``validate.py --checkpoint FILE`` needs no model flags. The record comes from the checkpoint (every
checkpoint train.py writes has it; the original's training checkpoints have their ``hparams``);
for a bare original release pass what it cannot tell, e.g.

    python util_scripts/prepare_checkpoint.py --checkpoint xcit-s12-cifar10.pth.tar \\
        --model xcit_small_12_p4_32 --dataset cifar10 --eps 8 --output-dir released/ \\
        --input-size 3 32 32 --crop-pct 1.0 --interpolation bicubic --normalization model \\
        --mean 0.4914 0.4822 0.4465 --std 0.2471 0.2435 0.2616

The weights are checked against ``--model`` before anything is written. Errors end with one line
on stderr and exit code 2.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: make the repository's `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.arg_parser.common import check_mean_std  # noqa: E402
from src.arg_parser.export import build_export_parser as build_parser  # noqa: E402
from src.checkpoint_export import export_released_checkpoint  # noqa: E402
from src.errors import UsageError, run_cli  # noqa: E402


def _export(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        check_mean_std(args.mean, args.std)
        overrides = {"num_classes": args.num_classes, "patch_size": args.patch_size, "input_size": args.input_size,
                     "crop_pct": args.crop_pct, "interpolation": args.interpolation,
                     "normalization": args.normalization, "mean": args.mean, "std": args.std}
        paths = export_released_checkpoint(
            args.checkpoint, args.model, args.dataset, args.output_dir, eps=args.eps, use_ema=args.use_ema,
            trust=args.trust_checkpoint, verify=not args.no_verify, eval_overrides=overrides)
    except (ValueError, OSError) as e:  # bad names, unknown model, unwritable folder (CheckpointError: run_cli)
        raise UsageError(str(e)) from None
    for path in paths.values():
        print(path)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run the export; returns the process exit code (0 ok, 2 bad input)."""
    return run_cli(_export, argv)


if __name__ == "__main__":
    sys.exit(main())
