#!/usr/bin/env python3
"""Cost of one adversarial training step relative to a clean step, measured side by side.

For each model: a clean training step (``CleanTrainingLoss``), PGD-k steps (``AdvTrainingLoss``)
in the faithful mode (``--adv-clean-logits train``: the original's extra train-mode clean forward
with graph) and the efficient mode (``skip``), optionally ``nograd``, and TRADES-k
(``TRADESLoss``), each as a ratio to the clean step and to its floor:

* the analytic floor of the cost model (peers-and-cost-model.md section 4.1), with F one forward:
  efficient (2k + 3)F / 3F, faithful (2k + 4)F / 3F, TRADES (2k + 7)F / 3F;
* a measured floor built from timed primitives of the same model and batch: T a bare training step
  (forward, backward, SGD), A a bare attack step (eval-mode forward + gradient w.r.t. the input
  only), G a train-mode forward with graph, F a no-grad forward: efficient (kA + T) / T,
  faithful (kA + T + G) / T, TRADES (F + kA + 2T) / T. Being above the analytic floor but on the
  measured one means the model/CPU kernels do not follow the 1F : 2F forward : backward rule;
  being above the measured floor means overhead in our code.

All variants are interleaved round by round (medians after warm-up). Quick run:

    python benchmarks/adv_step_cost.py --models test_vit --steps 1 --trades-steps 1 --batch-size 8 \
        --rounds 1 --reps 1 --warmup 0
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import bench_common as bc
from src.attacks import AdvTrainingLoss, AttackCfg, TRADESLoss
from src.setup_task import CleanTrainingLoss

EPS = 8 / 255


def attack_cfg(k: int) -> AttackCfg:
    return AttackCfg(name="pgd", eps=EPS, eps_schedule="constant", eps_schedule_period=0, zero_eps_epochs=0,
                     step_size=1.5 * EPS / k, steps=k, norm="linf", boundaries=(0, 1))


def loss_step(model: nn.Module, loss_fn: nn.Module, opt: torch.optim.Optimizer, x, y) -> Callable[[], None]:
    """One optimizer step through one of the project's training losses (what train.py runs)."""
    def run() -> None:
        loss, _, _ = loss_fn(model, x, y, 10)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def primitives(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> Dict[str, Callable[[], None]]:
    """Bare PyTorch building blocks whose times make the measured floor."""
    def forward_nograd() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    def forward_graph() -> None:
        model.train()
        model(x).sum()

    def attack_step() -> None:
        model.eval()
        xa = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(xa), y, reduction="sum")
        torch.autograd.grad(loss, xa)

    def train_step() -> None:
        model.train()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return {"prim F: forward no-grad": forward_nograd, "prim G: forward with graph": forward_graph,
            "prim A: attack step (input grad)": attack_step, "prim T: train step": train_step}


def variants(model, opt, x, y, steps: List[int], modes: List[str], trades_steps: List[int]
             ) -> Dict[str, Tuple[Callable[[], None], str, int]]:
    """name -> (callable, kind, k) for every step variant measured."""
    ce = nn.CrossEntropyLoss()
    out: Dict[str, Tuple[Callable[[], None], str, int]] = {
        "clean": (loss_step(model, CleanTrainingLoss(ce), opt, x, y), "clean", 0)}
    for k in steps:
        for mode in modes:
            label = {"train": "faithful", "skip": "efficient", "nograd": "nograd"}[mode]
            loss_fn = AdvTrainingLoss(attack_cfg(k), ce, clean_logits=mode)
            out[f"pgd-{k} {label}"] = (loss_step(model, loss_fn, opt, x, y), mode, k)
    for k in trades_steps:
        out[f"trades-{k}"] = (loss_step(model, TRADESLoss(attack_cfg(k), ce, 6.0), opt, x, y), "trades", k)
    return out


def floors(kind: str, k: int, prim: Dict[str, float]) -> Tuple[float, float]:
    """(analytic, measured) floor of a variant's time as a multiple of the clean step."""
    f, g, a, t = (prim["prim F: forward no-grad"], prim["prim G: forward with graph"],
                  prim["prim A: attack step (input grad)"], prim["prim T: train step"])
    if kind == "clean":
        return 1.0, 1.0
    if kind == "skip":
        return (2 * k + 3) / 3, (k * a + t) / t
    if kind in ("train", "nograd"):  # nograd's forward has no graph: F instead of G
        return (2 * k + 4) / 3, (k * a + t + (g if kind == "train" else f)) / t
    return (2 * k + 7) / 3, (f + k * a + 2 * t) / t


def bench_model(name: str, ns: argparse.Namespace, device: torch.device) -> Dict:
    torch.manual_seed(0)
    model = bc.create_model(name, img_size=ns.img_size).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.rand(ns.batch_size, 3, ns.img_size, ns.img_size, device=device)
    y = torch.randint(0, 10, (ns.batch_size,), device=device)
    prim_fns = primitives(model, opt, x, y)
    var = variants(model, opt, x, y, ns.steps, ns.modes, ns.trades_steps)
    fns = dict(prim_fns, **{n: v[0] for n, v in var.items()})
    timings = bc.interleaved(fns, ns.rounds, ns.reps, ns.warmup, device)
    samples, other = (timings.cpu, timings.wall) if ns.clock == "cpu" else (timings.wall, timings.cpu)
    prim = {n: bc.median(samples[n]) for n in prim_fns}
    clean = bc.median(samples["clean"])
    rows = [dict(variant=n, seconds=prim[n], x_clean=prim[n] / clean) for n in prim_fns]
    for n, (_, kind, k) in var.items():
        t = bc.median(samples[n])
        analytic, measured = floors(kind, k, prim)
        rows.append(dict(variant=n, mode=kind, k=k, seconds=t, x_clean=t / clean,
                         x_clean_spread=bc.ratio_spread(samples[n], samples["clean"]),
                         x_clean_other_clock=bc.median(other[n]) / bc.median(other["clean"]),
                         analytic_floor=analytic, x_analytic_floor=t / clean / analytic,
                         measured_floor=measured, x_measured_floor=t / clean / measured))
    return {"model": name, "img_size": ns.img_size, "batch_size": ns.batch_size, "clock": ns.clock, "rows": rows,
            "wall_s": timings.wall, "cpu_s": timings.cpu}


def main(argv=None) -> int:
    p = bc.cli_parser(__doc__, __file__)
    p.add_argument("--models", nargs="+", default=["resnet18"],
                   help=f"timm names or presets {sorted(bc.MODEL_PRESETS)}")
    p.add_argument("--img-size", type=bc.COUNT, default=32)
    p.add_argument("--batch-size", type=bc.COUNT, default=64)
    p.add_argument("--steps", type=bc.ATTACK_STEPS, nargs="+", default=[1, 2, 10], help="PGD steps k")
    p.add_argument("--modes", nargs="+", default=["train", "skip"], choices=["train", "nograd", "skip"],
                   help="--adv-clean-logits modes: train (faithful), skip (efficient), nograd")
    p.add_argument("--trades-steps", type=bc.ATTACK_STEPS, nargs="*", default=[10])
    bc.add_common_args(p)
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    device = bc.resolve_device(ns.device)
    results = [bench_model(m, ns, device) for m in ns.models]
    for r in results:
        bc.print_table(f"{r['model']} {r['img_size']}px batch {r['batch_size']}, {torch.get_num_threads()} threads, "
                       f"{ns.clock} clock",
                       ["variant", "s/step", "x clean", "x clean (other clock)", "analytic floor", "x analytic", "measured floor",
                        "x measured"],
                       [[row["variant"], row["seconds"], row["x_clean"], row.get("x_clean_other_clock", ""),
                         row.get("analytic_floor", ""),
                         row.get("x_analytic_floor", ""), row.get("measured_floor", ""),
                         row.get("x_measured_floor", "")] for row in r["rows"]])
    payload = {"benchmark": "adv_step_cost", "command": bc.command_line(), "machine": bc.machine_info(device),
               "options": vars(ns), "results": results}
    bc.write_json(ns.json, f"adv_step_cost-{'-'.join(ns.models)}.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(bc.run_cli(main))
