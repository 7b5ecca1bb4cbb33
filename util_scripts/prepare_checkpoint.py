#!/usr/bin/env python3
"""Export a training checkpoint as a released checkpoint.

    python util_scripts/prepare_checkpoint.py --checkpoint gs://bucket/run/best.pth.tar \\
        --model xcit_small_12_p4_32 --dataset cifar10 --eps 8 --output-dir released/

writes ``released/xcit_small_12_p4_32-cifar10-eps-8.pth.tar`` (the bare unwrapped state dict:
the original's release format, loadable by timm and RobustBench-style code) and a
``.safetensors`` twin whose metadata records the architecture, dataset, eps and, for
``--normalize-model`` runs, the normalization mean/std. The weights are checked against
``--model`` before anything is written. Errors end with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: make the repository's `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.checkpoint import CheckpointError, export_released_checkpoint  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export a training checkpoint (local or gs://) as {model}-{dataset}[-eps-{eps}].pth.tar "
                    "plus a .safetensors copy.")
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="training checkpoint (e.g. <run>/best.pth.tar), local, gs:// or any fsspec URL")
    parser.add_argument("--model", required=True, metavar="NAME", help="model name the weights belong to")
    parser.add_argument("--dataset", required=True, metavar="NAME", help="dataset name used in the file name")
    parser.add_argument("--eps", default=None, type=float, metavar="N",
                        help="training epsilon in /255 units, added to the file name as -eps-N")
    parser.add_argument("--use-ema", action="store_true", help="export the EMA weights (model_ema)")
    parser.add_argument("--output-dir", required=True, metavar="DIR", help="folder for the released files")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a checkpoint that needs arbitrary unpickling (can run code): only for "
                             "files from a source you trust")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip checking the weights against --model (e.g. models built with extra kwargs)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the export; returns the process exit code (0 ok, 2 bad input)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and the error
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        paths = export_released_checkpoint(
            args.checkpoint, args.model, args.dataset, args.output_dir, eps=args.eps, use_ema=args.use_ema,
            trust=args.trust_checkpoint, verify=not args.no_verify)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
