#!/usr/bin/env python3
"""Where train.py's per-step overhead over the plain loop could come from, each part timed alone.

Interleaved in one process, per training step of the ``train_overhead.py`` setting (digits,
``--no-aug``, ``--workers 0``, batch 64):

* ``data: train.py loader``: one batch from ``src.data.create_loader`` over ``DigitsDataset``
  with train.py's ``--no-aug`` transform (``src.data.build_train_transform``; at the native 32 px
  the dataset serves its images as tensors, without the PIL round trip), averaged over an epoch;
* ``data: tensor slicing``: what the plain loop does instead (index a tensor held in memory);
* ``finite check``: the engine's guard against non-finite steps (``src.engine.FiniteGuard``: a
  fused gradient norm and ``isfinite`` folded into a device flag; read once per log interval);
* ``metric sums``: the device-side running sums of loss, clean and robust accuracy;
* ``lr scheduler``: timm's cosine ``step_update``;
* ``step``: the training step itself (PGD-k, efficient mode: ``AdvTrainingLoss``), for scale, and
  the same step written as the plain loop writes it (``plain_loop.pgd_linf``, forward, backward,
  SGD): their difference is what our loss and attack code cost beyond the arithmetic.

    python benchmarks/overhead_breakdown.py --model resnet18 --batch-size 64 --attack-steps 2
"""
from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Callable, Dict

import torch
import torch.nn as nn

import bench_common as bc
import plain_loop
from adv_step_cost import attack_cfg, loss_step
from src.attacks import AdvTrainingLoss


def loader_batch(batch_size: int) -> Callable[[], None]:
    """Draw one batch from train.py's loader; a new epoch starts when one runs out."""
    from src.data import DigitsDataset, build_train_transform, create_loader

    tf = build_train_transform(SimpleNamespace(no_aug=True, train_interpolation="random"),
                               {"input_size": (3, 32, 32)})
    loader = create_loader(DigitsDataset("train", transform=tf), batch_size, is_training=True)
    it = [iter(loader)]

    def run() -> None:
        try:
            next(it[0])
        except StopIteration:
            it[0] = iter(loader)
            next(it[0])
    return run


def slicing_batch(batch_size: int) -> Callable[[], None]:
    x, y = plain_loop.digits_tensors("train")
    state = {"order": torch.randperm(len(y)), "i": 0}

    def run() -> None:
        if state["i"] + batch_size > len(y):
            state["order"], state["i"] = torch.randperm(len(y)), 0
        idx = state["order"][state["i"]:state["i"] + batch_size]
        x[idx], y[idx]
        state["i"] += batch_size
    return run


def finite_check(model: nn.Module, loss: torch.Tensor) -> Callable[[], None]:
    from src.engine import FiniteGuard

    params = [p for p in model.parameters() if p.requires_grad]
    guard = FiniteGuard(loss.device, 0, 0)

    def run() -> None:
        guard.observe(loss.detach(), params, 0)
    return run


def metric_sums(logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> Callable[[], None]:
    sums = torch.zeros(3, dtype=torch.float64)

    def run() -> None:
        sums[0] += loss.detach().double() * y.shape[0]
        sums[1] += (logits.argmax(-1) == y).sum().double()
        sums[2] += (logits.argmax(-1) == y).sum().double()
    return run


def plain_step(model: nn.Module, opt: torch.optim.Optimizer, x, y, steps: int) -> Callable[[], None]:
    eps = 8 / 255

    def run() -> None:
        model.eval()
        x_adv = plain_loop.pgd_linf(model, x, y, eps, 1.5 * eps / steps, steps)
        model.train()
        loss = nn.functional.cross_entropy(model(x_adv), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def main(argv=None) -> int:
    p = bc.cli_parser(__doc__, __file__)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch-size", type=bc.COUNT, default=64)
    p.add_argument("--attack-steps", type=bc.ATTACK_STEPS, default=2)
    bc.add_common_args(p, rounds=3, reps=5, warmup=1, device=False)
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    from timm.scheduler import CosineLRScheduler

    torch.manual_seed(0)
    model = bc.create_model(ns.model, img_size=32)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.rand(ns.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (ns.batch_size,))
    ce = nn.CrossEntropyLoss()
    step = loss_step(model, AdvTrainingLoss(attack_cfg(ns.attack_steps), ce, clean_logits="skip"), opt, x, y)
    step()  # gradients exist from here on
    with torch.no_grad():
        logits = model(x)
    loss = ce(logits, y)
    sched = CosineLRScheduler(opt, t_initial=10)
    fns: Dict[str, Callable[[], None]] = {
        "data: train.py loader": loader_batch(ns.batch_size), "data: tensor slicing": slicing_batch(ns.batch_size),
        "finite check": finite_check(model, loss), "metric sums": metric_sums(logits, y, loss),
        "lr scheduler": lambda: sched.step_update(num_updates=1), f"step (PGD-{ns.attack_steps} efficient)": step,
        f"step, plain loop's code (PGD-{ns.attack_steps})": plain_step(model, opt, x, y, ns.attack_steps)}
    t = bc.interleaved(fns, ns.rounds, ns.reps, ns.warmup)
    samples = t.cpu if ns.clock == "cpu" else t.wall
    step_s = bc.median(samples[f"step (PGD-{ns.attack_steps} efficient)"])
    rows = [dict(part=n, ms=1000 * bc.median(samples[n]), pct_of_step=100 * bc.median(samples[n]) / step_s)
            for n in fns]
    bc.print_table(f"per-step costs, {ns.model} batch {ns.batch_size}, {torch.get_num_threads()} threads, "
                   f"{ns.clock} clock", ["part", "ms per step", "% of the step"],
                   [[r["part"], r["ms"], r["pct_of_step"]] for r in rows])
    payload = {"benchmark": "overhead_breakdown", "command": bc.command_line(),
               "machine": bc.machine_info(torch.device("cpu")), "options": vars(ns), "rows": rows,
               "wall_s": t.wall, "cpu_s": t.cpu}
    bc.write_json(ns.json, f"overhead_breakdown-{ns.model}.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(bc.run_cli(main))
