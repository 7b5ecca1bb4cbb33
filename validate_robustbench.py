#!/usr/bin/env python3
"""RobustBench evaluation (clean + AutoAttack 'standard' accuracy) of a timm / robust-vits model.

    python validate_robustbench.py --model xcit_small_12_p16_224 --checkpoint ckpt.pth.tar \
        --dataset imagenet --data-dir ~/imagenet --eps 4 --num-classes 1000 --output report.json

Reimplements RobustBench's ``benchmark()`` protocol (same data, example order, 5000 ImageNet ids,
preprocessing, AutoAttack standard, model_info JSON fields) without the ``robustbench`` package;
see ``src/robustbench.py``. Beyond it: resumable after a kill (per-chunk state next to the
report) and shardable over processes with an exact merge:

    torchrun --nproc_per_node 8 validate_robustbench.py ...            # one shard per process
    python validate_robustbench.py ... --num-shards 4 --shard-id 2      # shards as separate jobs
    python validate_robustbench.py ... --num-shards 4 --merge-only      # merge them into the report
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from src.errors import UsageError, run_cli


class _Parser(argparse.ArgumentParser):
    """argparse that raises ``UsageError`` (one line, exit 2) instead of printing usage."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="validate_robustbench.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("the original's flags")
    g.add_argument("--patch-size", type=int, default=None,
                   help="XCiT only: change the model's patch size by removing stem strides (e.g. 4 for a p16 "
                        "model on CIFAR); default: keep the model's own (the original defaulted to 16 and "
                        "crashed on *_p4_32 models)")
    g.add_argument("--dataset", default="cifar10", help="cifar10, cifar100 or imagenet")
    g.add_argument("--data-dir", default="~/torch_data/",
                   help="CIFAR: folder holding cifar-10-batches-py/ or cifar-100-python/ (torchvision format); "
                        "ImageNet: folder holding val/<wnid>/ILSVRC2012_val_*.JPEG")
    g.add_argument("--crop-pct", type=float, default=None, help="override the model's crop_pct (ImageNet)")
    g.add_argument("--normalize", action="store_true",
                   help="ImageNet: normalize in the loader with the model's mean/std (attacks then run in "
                        "normalized space; prefer --mean/--std, which normalize inside the model)")
    g.add_argument("--checkpoint", default=None,
                   help="weights (local, gs://); without it the model's timm pretrained weights are used")
    g.add_argument("--model", default=None, help="timm or robust-vits model name")
    g.add_argument("--batch-size", type=int, default=512, help="batch size of the forward passes and AutoAttack")
    g.add_argument("--num-classes", type=int, default=None,
                   help="classes of the model (default: 10 / 100 / 1000 for cifar10 / cifar100 / imagenet)")
    g.add_argument("--eps", type=float, default=8, help="radius in /255 units (both norms: L2 0.5 is 127.5)")
    g.add_argument("--threat-model", default="Linf", help="Linf or L2")
    g.add_argument("--log-wandb", action="store_true",
                   help="log the numbers into the W&B run that trained the checkpoint (args.yaml next to it)")
    g.add_argument("--upsample-in-model", action="store_true",
                   help="CIFAR: resize and crop to the model's input size inside the model, so attacks "
                        "perturb the 32x32 pixels")
    g.add_argument("--mean", type=float, nargs="+", default=None,
                   help="normalize inside the model with this mean (missing --std: 1s)")
    g.add_argument("--std", type=float, nargs="+", default=None,
                   help="normalize inside the model with this std (missing --mean: 0s)")

    g = p.add_argument_group("robust-vits additions")
    g.add_argument("--n-examples", type=int, default=None,
                   help="evaluate the first N examples (default: RobustBench's 10000 for CIFAR, 5000 for ImageNet)")
    g.add_argument("--seed", type=int, default=0,
                   help="AutoAttack seed; each chunk uses seed + index of its first example")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints that need arbitrary unpickling (only for trusted files)")
    g.add_argument("--use-ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    g.add_argument("--output", default=None,
                   help="JSON report path, local or gs:// (default output/robustbench/<model>-<dataset>-"
                        "<threat>-eps<eps>.json)")
    g.add_argument("--state-dir", default=None,
                   help="per-shard resumable state (default: <report without .json>.state next to the report)")
    g.add_argument("--chunk-size", type=int, default=None,
                   help="examples per chunk: the unit of resumption, sharding and seeding (default: --batch-size; "
                        "0 = all examples in one AutoAttack call, exactly like RobustBench)")
    g.add_argument("--num-shards", type=int, default=1, help="split the chunks over this many separate jobs")
    g.add_argument("--shard-id", type=int, default=0, help="which of the --num-shards jobs this is")
    g.add_argument("--merge-only", action="store_true",
                   help="evaluate nothing: merge the shards' state into the report (fails if examples are missing)")
    g.add_argument("--poll-seconds", type=float, default=5.0,
                   help="torchrun: how often rank 0 checks whether the other ranks have finished")
    g.add_argument("--force-cpu", action="store_true", help="run on the CPU even when a GPU is present")
    g.add_argument("--workers", type=int, default=4, help="data loading processes (ImageNet)")
    return p


def _run(argv: Optional[Sequence[str]] = None) -> int:
    from src.robustbench import run
    from src.cli import setup_logging

    args = build_parser().parse_args(argv)
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
