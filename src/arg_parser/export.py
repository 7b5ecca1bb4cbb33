"""util_scripts/prepare_checkpoint.py's flags: export a training checkpoint as a released one."""
from __future__ import annotations

import argparse

from src.arg_parser.common import CliParser, bool_flag
from src.arg_parser.values import (CROP_PCT, INTERPOLATION, MEAN, REQUIRED_INPUT_PATH, REQUIRED_OUTPUT_PATH, STD, Choice,
                                    nonneg_float, positive_int)

__all__ = ["build_export_parser"]


def build_export_parser() -> CliParser:
    p = CliParser(prog="prepare_checkpoint.py",
                  description="Export a training checkpoint or an original release (local or gs://) as "
                              "{model}-{dataset}[-eps-{eps}].pth.tar plus a .safetensors copy, both recording what "
                              "evaluating them needs.")
    p.add_argument("--checkpoint", required=True, type=REQUIRED_INPUT_PATH, metavar="PATH",
                   help="training checkpoint (e.g. <run>/best.pth.tar), local, gs:// or any fsspec URL")
    p.add_argument("--model", required=True, metavar="NAME", help="model name the weights belong to")
    p.add_argument("--dataset", required=True, metavar="NAME",
                   help="dataset name used in the file name and metadata (a known dataset, e.g. cifar10, must "
                        "match the model's class count)")
    p.add_argument("--eps", default=None, type=nonneg_float(), metavar="N",
                   help="training epsilon in /255 units, added to the file name as -eps-N")
    p.add_argument("--use-ema", action="store_true", help="export the EMA weights (model_ema)")
    p.add_argument("--output-dir", required=True, type=REQUIRED_OUTPUT_PATH, metavar="DIR", help="folder for the released files")
    bool_flag(p, "--trust-checkpoint", command_line_only="it lets a checkpoint run code while it is loaded",
              help="allow a checkpoint that needs arbitrary unpickling (can run code): only for files from a "
                   "source you trust")
    bool_flag(p, "--no-verify", command_line_only="it skips checking the weights against --model",
              help="skip checking the weights against --model (e.g. models built with extra kwargs)")
    g = p.add_argument_group("evaluation record", "what evaluating the weights needs, for checkpoints that do not "
                             "record it (the original's releases and training checkpoints); a given flag replaces "
                             "the recorded value")
    g.add_argument("--num-classes", type=positive_int(), default=None, metavar="N", help="classes (default: from the weights)")
    g.add_argument("--patch-size", type=positive_int(), default=None, metavar="N",
                   help="XCiT: the patch size the run adapted the stem to (default: the model's own)")
    g.add_argument("--input-size", type=positive_int(), nargs=3, default=None, metavar="N", help="input C H W of the evaluation")
    g.add_argument("--crop-pct", type=CROP_PCT, default=None, metavar="PCT", help="center-crop fraction")
    g.add_argument("--interpolation", default=None, type=INTERPOLATION, metavar="NAME", help="resize interpolation (e.g. bicubic)")
    g.add_argument("--normalization", default=None, type=Choice(names=("model", "raw", "loader")),
                   help="how the network's inputs were normalized: inside the model (--normalize-model runs), raw "
                        "[0, 1] pixels, or by the loader")
    g.add_argument("--mean", type=MEAN, nargs="+", default=None, metavar="MEAN",
                   help="normalization mean (default: the model's)")
    g.add_argument("--std", type=STD, nargs="+", default=None, metavar="STD", help="normalization std")
    return p
