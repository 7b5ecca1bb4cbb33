#!/usr/bin/env python3
"""Framework overhead of train.py: a one-epoch PGD-k run against the plain loop doing the same work.

Both run in this process, interleaved round by round: ``train.py`` through its ``main(argv)``
(digits, ``--no-aug``, ``--workers 0``, SGD, no label smoothing, ``--epochs 1``: one training
epoch, the per-epoch clean + PGD-k evaluation of the validation split, checkpoints) and
:func:`plain_loop.train_run` (same model, optimizer, attack, evaluation; data held in memory; one
``torch.save``). Reported, each as train.py / plain: the training epoch alone and the per-epoch
evaluation (wall time: train.py's own timings, taken from its log records), and the whole run
(``main``) in wall and in CPU time.

    python benchmarks/train_overhead.py --model resnet18 --attack-steps 2 --clean-logits train
    python benchmarks/train_overhead.py --model test_vit --batch-size 100 --rounds 1 --warmup 0  # quick
"""
from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

import bench_common as bc
import plain_loop


class _TimingRecords(logging.Handler):
    """Collects train.py's "train epoch N done in S" and evaluation timing log records (raw floats)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.train_s: List[float] = []
        self.eval_s: List[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = str(record.msg)
        if msg.startswith("train epoch %d done in %.1fs"):
            self.train_s.append(float(record.args[1]))
        elif msg.startswith("%s: loss %.4f top1") and record.args and record.args[0] == "eval":
            self.eval_s.append(float(record.args[-1]))


def train_argv(ns: argparse.Namespace, out: str, experiment: str) -> List[str]:
    return ["--dataset", "digits", "--model", ns.model, "--num-classes", "10", "--input-size", "3", "32", "32",
            "--crop-pct", "1.0", "--interpolation", "bicubic", "-b", str(ns.batch_size),
            "-vb", str(ns.eval_batch_size), "--opt", "sgd", "--lr", str(ns.lr), "--momentum", "0.9",
            "--weight-decay", "1e-4", "--sched", "cosine", "--warmup-epochs", "0", "--cooldown-epochs", "0",
            "--smoothing", "0", "--no-aug", "--workers", "0", "--log-interval", "1000", "--seed", "0",
            "--epochs", "1", "--adv-training", "pgd", "--attack-eps", str(ns.eps), "--attack-steps",
            str(ns.attack_steps), "--adv-clean-logits", ns.clean_logits, "--checkpoint-hist", "1",
            "--output", out, "--experiment", experiment]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-batch-size", type=int, default=99, help="99 divides the 297 validation images")
    p.add_argument("--attack-steps", type=int, default=2)
    p.add_argument("--eps", type=float, default=8, help="/255 units")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--clean-logits", default="train", choices=["train", "nograd", "skip"],
                   help="--adv-clean-logits of train.py: train = faithful, skip = efficient")
    bc.add_common_args(p, rounds=3, reps=1, warmup=1, device=False, clock=False)
    ns = p.parse_args(argv)
    if ns.clean_logits == "nograd":
        p.error("the plain loop mirrors --clean-logits train and skip only")
    torch.set_num_threads(ns.threads)
    import train as train_cli

    records = _TimingRecords()
    logger = logging.getLogger("robust_vits")
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    plain_runs: List[Dict[str, Any]] = []
    counter = [0]

    def run_cli() -> None:
        counter[0] += 1
        t = time.perf_counter()
        rc = train_cli.main(train_argv(ns, tmp, f"run{counter[0]}"))
        if rc != 0:
            raise SystemExit(f"error: train.py exited with {rc}")
        records_total.append(time.perf_counter() - t)
        shutil.rmtree(Path(tmp) / f"run{counter[0]}", ignore_errors=True)

    def run_plain() -> None:
        plain_runs.append(plain_loop.train_run(ns.model, ns.batch_size, ns.eval_batch_size, ns.eps / 255,
                                               ns.attack_steps, ns.lr, ns.clean_logits,
                                               str(Path(tmp) / "plain.pth")))

    records_total: List[float] = []
    try:
        timings = bc.interleaved({"train.py": run_cli, "plain loop": run_plain}, ns.rounds, ns.reps, ns.warmup)
    finally:
        logger.removeHandler(records)
        shutil.rmtree(tmp, ignore_errors=True)
    skip = ns.warmup  # the first records belong to the warm-up calls
    cli_train, cli_eval = records.train_s[skip:], records.eval_s[skip:]
    plain = plain_runs[skip:]
    if len(cli_train) != len(plain) or not plain:
        raise SystemExit("error: train.py's 'train epoch done' log record was not seen once per run")
    med = statistics.median
    rows = [
        dict(part="training epoch", train_py_s=med(cli_train), plain_s=med([r["train_epoch_s"] for r in plain])),
        dict(part="per-epoch evaluation", train_py_s=med(cli_eval) if cli_eval else float("nan"),
             plain_s=med([r["eval_s"] for r in plain])),
        dict(part="whole run (main), wall", train_py_s=bc.median(timings.wall["train.py"]),
             plain_s=bc.median(timings.wall["plain loop"])),
        dict(part="whole run (main), CPU", train_py_s=bc.median(timings.cpu["train.py"]),
             plain_s=bc.median(timings.cpu["plain loop"])),
    ]
    for r in rows:
        r["ratio"] = r["train_py_s"] / r["plain_s"]
    per_round = [a / b["train_epoch_s"] for a, b in zip(cli_train, plain)]
    rows[0]["ratio_spread"] = [min(per_round), max(per_round)]
    rows[2]["ratio_spread"] = bc.ratio_spread(timings.wall["train.py"], timings.wall["plain loop"])
    rows[3]["ratio_spread"] = bc.ratio_spread(timings.cpu["train.py"], timings.cpu["plain loop"])
    title = (f"train.py vs plain loop: {ns.model}, digits, batch {ns.batch_size}, PGD-{ns.attack_steps}, "
             f"--adv-clean-logits {ns.clean_logits}, {torch.get_num_threads()} threads")
    bc.print_table(title, ["part", "train.py s", "plain s", "ratio", "ratio min..max over rounds"],
                   [[r["part"], r["train_py_s"], r["plain_s"], r["ratio"],
                     "..".join(f"{v:.3f}" for v in r.get("ratio_spread", [])) or "-"] for r in rows])
    payload = {"benchmark": "train_overhead", "command": bc.command_line(), "machine": bc.machine_info(
        torch.device("cpu")), "options": vars(ns), "rows": rows,
        "raw": {"train_py_epoch_s": cli_train, "train_py_eval_s": cli_eval, "plain": plain,
                "whole_run_wall_s": timings.wall, "whole_run_cpu_s": timings.cpu}}
    bc.write_json(ns.json, f"train_overhead-{ns.model}-pgd{ns.attack_steps}-{ns.clean_logits}.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
