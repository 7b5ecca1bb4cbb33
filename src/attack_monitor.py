"""The online attack-strength monitor (``--monitor-attack-steps K``).

Every ``--monitor-every`` epochs it attacks a fixed validation subset (``--monitor-examples``)
twice, at the epoch's training eps: with the training attack (``--attack``, ``--attack-steps``,
``--attack-lr``, as the training loss crafts) and with PGD-K (step 1.5 * eps / K, the paper's
attack-effectiveness setting, original-behaviour.md §6.1). Its number is the paper's relative
robust-loss gap, signed and in percent::

    gap = (L_K - L_train) / L_K * 100

where L is the mean cross-entropy on the adversarial examples. A gap near 0 means the training
attack finds (nearly) the loss PGD-K finds; a large gap means training optimizes against a much
weaker attack than the one it will be evaluated with: the signature of a too-weak training attack
or of catastrophic overfitting. The warning threshold ``--monitor-warn-gap`` defaults to 20 %:
in the paper's own data (notebooks/data/attack-effectiveness-*.csv, measured with
``src.plots.relative_gap``) PGD-1's gap to PGD-200 is at most 12.7 % over every epoch of the
healthy XCiT-S12, ResNet-50 and ConvNeXt-T runs (means 4.3, 7.6 and 3.8 %), while the run the
paper reports as problematic (XCiT-S12*) reaches 71.5 % (mean 26.3 %).
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from src.errors import UsageError

_logger = logging.getLogger("robust_vits")

MONITOR_COLUMN = "monitor_gap"  # the extra summary.csv column (only when the monitor is on)

__all__ = ["MONITOR_COLUMN", "AttackMonitor", "build_monitor", "relative_gap_pct"]


def relative_gap_pct(loss_ref: float, loss_train: float) -> float:
    """``(L_K - L_train) / L_K * 100`` (NaN when L_K is 0 or not finite)."""
    if not loss_ref or loss_ref != loss_ref or abs(loss_ref) == float("inf"):
        return float("nan")
    return (loss_ref - loss_train) / loss_ref * 100.0


@dataclass
class AttackMonitor:
    """What the monitor attacks with, on which examples, and when."""
    loader: Any
    train_attack: Callable  # (model, x, y, epoch) -> x_adv: the training attack at the epoch's eps
    ref_steps: int
    eps_at: Callable[[int], float]  # epoch -> eps in [0, 1] units
    norm: str
    boundaries: tuple
    num_classes: Optional[int]
    every: int
    warn_gap: float
    num_epochs: int
    seed: int
    train_desc: str

    def due(self, epoch: int) -> bool:
        return (epoch + 1) % self.every == 0 or epoch + 1 == self.num_epochs

    def measure(self, model: nn.Module, epoch: int, dev_env, attack_mode: str = "eval") -> Dict[str, float]:
        """``monitor_gap`` (and the two losses) for ``model`` at ``epoch``; NaN at eps 0.

        Runs under its own RNG state (seeded by epoch), so turning the monitor on changes no
        training or evaluation number.
        """
        from src.attacks import make_attack
        from src.engine import evaluate_loop

        eps = float(self.eps_at(epoch))
        if eps <= 0:
            return {MONITOR_COLUMN: float("nan"), "monitor_train_loss": float("nan"), "monitor_ref_loss": float("nan")}
        ref = make_attack("pgd", eps, 1.5 * eps / self.ref_steps, self.ref_steps, self.norm, self.boundaries,
                          criterion=nn.NLLLoss(reduction="sum"), num_classes=self.num_classes, dev_env=dev_env)
        losses = []
        for name, attack in (("train", lambda m, x, y: self.train_attack(m, x, y, epoch)), ("ref", ref)):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + 7 * epoch + (name == "ref"))
                ev = evaluate_loop(model, self.loader, dev_env, attack, attack_mode=attack_mode,
                                   desc=f"monitor {name}", topk=1)
            losses.append(ev.adv_loss)
        gap = relative_gap_pct(losses[1], losses[0])
        if dev_env.primary:
            _logger.info("attack monitor epoch %d: robust loss %.4f (%s) vs %.4f (PGD-%d): gap %.1f%%", epoch,
                         losses[0], self.train_desc, losses[1], self.ref_steps, gap)
            if gap > self.warn_gap:
                _logger.warning("epoch %d: the training attack (%s) is far weaker than PGD-%d: its robust loss is %.1f%% "
                                "below PGD-%d's (more than --monitor-warn-gap %g%%). Training against a weak attack "
                                "overstates robustness: catastrophic overfitting, or too few / too small attack "
                                "steps", epoch, self.train_desc, self.ref_steps, gap, self.ref_steps,
                                self.warn_gap)
        return {MONITOR_COLUMN: gap, "monitor_train_loss": losses[0], "monitor_ref_loss": losses[1]}


def build_monitor(args: argparse.Namespace, eval_loader: Any, num_classes: Optional[int],
                  num_epochs: int, dev_env) -> Optional[AttackMonitor]:
    """The monitor of ``--monitor-attack-steps`` (None when off); bad settings are a ``UsageError``."""
    from src.attacks import eps_schedule, make_train_attack, resolve_attack_cfg
    from src.smoke import fixed_subset, loader_over

    k = getattr(args, "monitor_attack_steps", None)
    if k is None:
        return None
    if not args.adv_training:
        raise UsageError("--monitor-attack-steps needs --adv-training (it compares the training attack with PGD-K)")
    cfg = resolve_attack_cfg(args, eval=False)
    train_attack = make_train_attack(cfg.name, cfg.eps_schedule, cfg.eps, cfg.eps_schedule_period,
                                     cfg.zero_eps_epochs, cfg.step_size, cfg.steps, cfg.norm, cfg.boundaries,
                                     criterion=nn.NLLLoss(reduction="sum"), num_classes=num_classes,
                                     logits_y=False, dev_env=dev_env)
    schedule = eps_schedule(cfg.eps_schedule, cfg.eps, cfg.eps_schedule_period, cfg.zero_eps_epochs)
    subset = fixed_subset(eval_loader.dataset, args.monitor_examples, "validation", "--monitor-examples")
    return AttackMonitor(loader=loader_over(eval_loader, subset, False), train_attack=train_attack, ref_steps=k,
                         eps_at=schedule, norm=cfg.norm, boundaries=cfg.boundaries, num_classes=num_classes,
                         every=args.monitor_every, warn_gap=args.monitor_warn_gap, num_epochs=num_epochs,
                         seed=args.seed,
                         train_desc=f"{cfg.name.upper()}-{cfg.steps}, step {cfg.step_size * 255:.3g}/255")
