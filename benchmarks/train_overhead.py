#!/usr/bin/env python3
"""Framework overhead of train.py: a one-epoch PGD-k run against the plain loop doing the same work.

Both run in this process, interleaved round by round: ``train.py`` through its ``main(argv)``
(digits, ``--no-aug``, ``--workers 0``, SGD, no label smoothing, ``--epochs 1``: one training
epoch, the per-epoch clean + PGD-k evaluation of the validation split, checkpoints) and
:func:`plain_loop.train_run` (same model, optimizer, attack, evaluation; data held in memory; one
``torch.save``). Reported, each as train.py / plain, in wall and in CPU time: the training epoch
alone, the per-epoch evaluation (both timed by wrapping the trainer's ``train_one_epoch`` and
``evaluate`` for the duration of the benchmark) and the whole run (``main``).

    python benchmarks/train_overhead.py --model resnet18 --attack-steps 2 --clean-logits train
    python benchmarks/train_overhead.py --model test_vit --batch-size 100 --rounds 1 --warmup 0  # quick
"""
from __future__ import annotations

import argparse
import contextlib
import io
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


class _Timed:
    """Wraps a function of ``src.trainer`` and records the wall and CPU seconds of every call."""

    def __init__(self, module, name: str):
        self.module, self.name, self.fn = module, name, getattr(module, name)
        self.wall: List[float] = []
        self.cpu: List[float] = []

    def __call__(self, *args, **kwargs):
        t, c = time.perf_counter(), time.process_time()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.wall.append(time.perf_counter() - t)
            self.cpu.append(time.process_time() - c)

    def __enter__(self) -> "_Timed":
        setattr(self.module, self.name, self)
        return self

    def __exit__(self, *exc) -> None:
        setattr(self.module, self.name, self.fn)


def train_argv(ns: argparse.Namespace, out: str, experiment: str) -> List[str]:
    return ["--dataset", "digits", "--model", ns.model, "--num-classes", "10", "--input-size", "3", "32", "32",
            "--crop-pct", "1.0", "--interpolation", "bicubic", "-b", str(ns.batch_size),
            "-vb", str(ns.eval_batch_size), "--opt", "sgd", "--lr", str(ns.lr), "--momentum", "0.9",
            "--weight-decay", "1e-4", "--sched", "cosine", "--warmup-epochs", "0", "--cooldown-epochs", "0",
            "--smoothing", "0", "--no-aug", "--workers", "0", "--log-interval", "1000", "--seed", "0",
            "--epochs", "1", "--adv-training", "pgd", "--attack-eps", str(ns.eps), "--attack-steps",
            str(ns.attack_steps), "--adv-clean-logits", ns.clean_logits, "--checkpoint-hist", "1",
            "--output", out, "--experiment", experiment]


def measure(ns: argparse.Namespace) -> Dict[str, Any]:
    """Interleaved train.py and plain-loop runs; per-part wall and CPU seconds of each (warm-up dropped)."""
    import train as train_cli
    from src import trainer

    tmp = tempfile.mkdtemp(prefix="bench-train-")
    plain: List[Dict[str, Any]] = []
    counter = [0]

    def run_cli() -> None:
        counter[0] += 1
        with contextlib.redirect_stdout(io.StringIO()):
            rc = train_cli.main(train_argv(ns, tmp, f"run{counter[0]}"))
        if rc != 0:
            raise SystemExit(f"error: train.py exited with {rc}")
        shutil.rmtree(Path(tmp) / f"run{counter[0]}", ignore_errors=True)

    def run_plain() -> None:
        plain.append(plain_loop.train_run(ns.model, ns.batch_size, ns.eval_batch_size, ns.eps / 255,
                                          ns.attack_steps, ns.lr, ns.clean_logits, str(Path(tmp) / "plain.pth")))

    try:
        with _Timed(trainer, "train_one_epoch") as epoch, _Timed(trainer, "evaluate") as evaluation:
            timings = bc.interleaved({"train.py": run_cli, "plain loop": run_plain}, ns.rounds, 1, ns.warmup)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    w = ns.warmup  # the first calls are the warm-up
    if len(epoch.wall) != len(plain) or len(evaluation.wall) != len(plain):
        raise SystemExit("error: train.py did not run src.trainer.train_one_epoch / evaluate once per run")
    return {"cli": {"train_epoch_wall_s": epoch.wall[w:], "train_epoch_cpu_s": epoch.cpu[w:],
                    "eval_wall_s": evaluation.wall[w:], "eval_cpu_s": evaluation.cpu[w:],
                    "total_wall_s": [t for r in timings.wall["train.py"] for t in r],
                    "total_cpu_s": [t for r in timings.cpu["train.py"] for t in r]},
            "plain": {k: [r[k] for r in plain[w:]] for k in plain[0] if k.endswith("_s")},
            "plain_metrics": [{"train": r["train"], "eval": r["eval"]} for r in plain[w:]]}


def main(argv=None) -> int:
    p = bc.cli_parser(__doc__, __file__)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch-size", type=bc.COUNT, default=64)
    p.add_argument("--eval-batch-size", type=bc.COUNT, default=99, help="99 divides the 297 validation images")
    p.add_argument("--attack-steps", type=bc.ATTACK_STEPS, default=2)
    p.add_argument("--eps", type=bc.nonneg_float(), default=8, help="/255 units")
    p.add_argument("--lr", type=bc.positive_float(), default=0.05)
    p.add_argument("--clean-logits", default="train", choices=["train", "skip"],
                   help="--adv-clean-logits of train.py: train = faithful, skip = efficient")
    bc.add_common_args(p, rounds=3, reps=1, warmup=1, device=False, clock=False)
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    raw = measure(ns)
    cli, plain = raw["cli"], raw["plain"]
    rows = []
    for part, cli_key, plain_key in [("training epoch", "train_epoch", "train_epoch"),
                                     ("per-epoch evaluation", "eval", "eval"), ("whole run (main)", "total", "total")]:
        for clock in ("wall", "cpu"):
            a, b = cli[f"{cli_key}_{clock}_s"], plain[f"{plain_key}_{clock}_s"]
            per_run = [x / y for x, y in zip(a, b)]
            rows.append(dict(part=part, clock=clock, train_py_s=statistics.median(a), plain_s=statistics.median(b),
                             ratio=statistics.median(a) / statistics.median(b),
                             ratio_spread=[min(per_run), max(per_run)]))
    title = (f"train.py vs plain loop: {ns.model}, digits, batch {ns.batch_size}, PGD-{ns.attack_steps}, "
             f"--adv-clean-logits {ns.clean_logits}, {torch.get_num_threads()} threads")
    bc.print_table(title, ["part", "clock", "train.py s", "plain s", "ratio", "ratio min..max over rounds"],
                   [[r["part"], r["clock"], r["train_py_s"], r["plain_s"], r["ratio"],
                     "..".join(f"{v:.3f}" for v in r["ratio_spread"])] for r in rows])
    payload = {"benchmark": "train_overhead", "command": bc.command_line(),
               "machine": bc.machine_info(torch.device("cpu")), "options": vars(ns), "rows": rows, "raw": raw}
    bc.write_json(ns.json, f"train_overhead-{ns.model}-pgd{ns.attack_steps}-{ns.clean_logits}.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(bc.run_cli(main))
