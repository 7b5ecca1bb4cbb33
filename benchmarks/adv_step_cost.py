#!/usr/bin/env python3
"""Cost of one adversarial training step relative to a clean step, measured side by side.

Prints, for PGD-k training with each ``--adv-clean-logits`` option (train = the original's extra
clean forward with graph, nograd, skip) and for TRADES, the measured time ratio to a clean
training step and the analytic ratio of the cost model (peers-and-cost-model.md section 4.1):
(2k + 3) / 3 for input-only attack gradients, (2k + 4) / 3 with the original's clean forward,
(2k + 7) / 3 for TRADES. Rounds are interleaved so machine noise hits every variant alike.

    .venv/bin/python benchmarks/adv_step_cost.py --model resnet18 --steps 1 2 --batch-size 64
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.attacks import AdvTrainingLoss, AttackCfg, TRADESLoss  # noqa: E402
from src.setup_task import CleanTrainingLoss  # noqa: E402


def step_time(model, loss_fn, opt, x, y, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        loss, _, _ = loss_fn(model, x, y, 10)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=5, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    ns = p.parse_args()
    torch.set_num_threads(ns.threads)
    import timm

    import src.models  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model(ns.model, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.rand(ns.batch_size, 3, ns.img_size, ns.img_size)
    y = torch.randint(0, 10, (ns.batch_size,))
    ce = nn.CrossEntropyLoss()
    variants = {"clean": (CleanTrainingLoss(ce), 1.0)}
    for k in ns.steps:
        cfg = AttackCfg(name="pgd", eps=8 / 255, eps_schedule="constant", eps_schedule_period=0, zero_eps_epochs=0,
                        step_size=1.5 * 8 / 255 / k, steps=k, norm="linf", boundaries=(0, 1))
        variants[f"pgd-{k} clean_logits=train"] = (AdvTrainingLoss(cfg, ce, clean_logits="train"), (2 * k + 4) / 3)
        variants[f"pgd-{k} clean_logits=nograd"] = (AdvTrainingLoss(cfg, ce, clean_logits="nograd"), (2 * k + 4) / 3)
        variants[f"pgd-{k} clean_logits=skip"] = (AdvTrainingLoss(cfg, ce, clean_logits="skip"), (2 * k + 3) / 3)
        variants[f"trades-{k}"] = (TRADESLoss(cfg, ce, 6.0), (2 * k + 7) / 3)
    for loss_fn, _ in variants.values():  # warm-up
        step_time(model, loss_fn, opt, x, y, 1)
    samples = {name: [] for name in variants}
    for _ in range(ns.rounds):
        for name, (loss_fn, _) in variants.items():
            samples[name].append(step_time(model, loss_fn, opt, x, y, ns.reps))
    clean = statistics.median(samples["clean"])
    print(f"model {ns.model} {ns.img_size}px batch {ns.batch_size}, {ns.threads} threads, torch {torch.__version__}")
    print(f"{'variant':32s} {'s/step':>8s} {'ratio':>7s} {'model':>7s}")
    for name, (_, analytic) in variants.items():
        t = statistics.median(samples[name])
        print(f"{name:32s} {t:8.4f} {t / clean:7.2f} {analytic:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
