"""util_scripts/prepare_checkpoint.py's flags: export a training checkpoint as a released one."""
from __future__ import annotations

import argparse

from src.arg_parser.common import CliParser, bool_flag
from src.arg_parser.values import nonneg_float

__all__ = ["build_export_parser"]


def build_export_parser() -> CliParser:
    p = CliParser(prog="prepare_checkpoint.py",
                  description="Export a training checkpoint (local or gs://) as {model}-{dataset}[-eps-{eps}].pth.tar "
                              "plus a .safetensors copy.")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="training checkpoint (e.g. <run>/best.pth.tar), local, gs:// or any fsspec URL")
    p.add_argument("--model", required=True, metavar="NAME", help="model name the weights belong to")
    p.add_argument("--dataset", required=True, metavar="NAME", help="dataset name used in the file name")
    p.add_argument("--eps", default=None, type=nonneg_float(), metavar="N",
                   help="training epsilon in /255 units, added to the file name as -eps-N")
    p.add_argument("--use-ema", action="store_true", help="export the EMA weights (model_ema)")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="folder for the released files")
    bool_flag(p, "--trust-checkpoint", command_line_only="it lets a checkpoint run code while it is loaded",
              help="allow a checkpoint that needs arbitrary unpickling (can run code): only for files from a "
                   "source you trust")
    bool_flag(p, "--no-verify", command_line_only="it skips checking the weights against --model",
              help="skip checking the weights against --model (e.g. models built with extra kwargs)")
    return p
