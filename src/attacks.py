"""Adversarial attacks, epsilon schedules and adversarial-training losses.

Everything here keeps the public names and semantics of the original light-recipe code
(``pgd``, ``make_attack``, ``make_train_attack``, ``AttackCfg``, ``AdvTrainingLoss``,
``TRADESLoss``, ``resolve_attack_cfg``) so that code written against it keeps working.

Conventions:

* Inputs are images in [0, 1] (or whatever ``boundaries`` says); normalization lives inside
  the model. Eps and step sizes are in input units here; the CLI's /255 units are converted
  once, in :func:`resolve_attack_cfg`.
* Attacks only ever differentiate with respect to the input (``torch.autograd.grad(loss,
  x_adv)``): no weight gradients are computed, parameters' ``.grad`` are never touched, and
  an attack step costs about one forward plus one input-only backward.
* The original's numerical quirks are kept on purpose (see the README's "Differences from the
  original" table): the +1e-5 added to the random start, the L2 random start drawn from
  N(-eps, eps), the step size computed from the *final* eps during eps warm-up, and the extra
  train-mode clean forward in :class:`AdvTrainingLoss` (opt-out with ``clean_logits``).
"""
from __future__ import annotations

import argparse
import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

_logger = logging.getLogger("robust_vits")

Boundaries = Tuple[float, float]
ProjectFn = Callable[[torch.Tensor, torch.Tensor, float, Boundaries], torch.Tensor]
InitFn = Callable[[torch.Tensor, float, ProjectFn, Boundaries], torch.Tensor]
AttackFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
TrainAttackFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], torch.Tensor]
EpsSchedule = Callable[[int], float]
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Added to every random start before projecting it, exactly like the original (a quirk kept so
# that numbers reproduce; it nudges the start by 1e-5 towards the upper bound).
INIT_OFFSET = 1e-5
# Keeps the normalized-gradient step finite when an example's gradient is exactly zero.
GRAD_NORM_EPS = 1e-10


# --------------------------------------------------------------------------------------------
# Threat models: random start, projection, step direction
# --------------------------------------------------------------------------------------------

def project_linf(x: torch.Tensor, x_adv: torch.Tensor, eps: float, boundaries: Boundaries) -> torch.Tensor:
    """Project ``x_adv`` onto the L-inf ball of radius ``eps`` around ``x``, then into the box.

    Both steps are coordinate-wise clamps, so the result is the exact Euclidean projection onto
    the intersection of the ball and the box.
    """
    lo, hi = boundaries
    x = x.detach()
    delta = torch.clamp(x_adv - x, -eps, eps)
    return torch.clamp(x + delta, lo, hi)


def project_l2(x: torch.Tensor, x_adv: torch.Tensor, eps: float, boundaries: Boundaries) -> torch.Tensor:
    """Shrink each example's perturbation to L2 norm <= ``eps``, then clamp into the box.

    ``renorm`` over dim 0 rescales only the examples whose norm exceeds ``eps`` (like the
    original); the box clamp afterwards can only shorten the perturbation further.
    """
    lo, hi = boundaries
    x = x.detach()
    delta = (x_adv - x).renorm(p=2, dim=0, maxnorm=eps)
    return torch.clamp(x + delta, lo, hi)


def _logical_order_empty(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor like ``x`` but contiguous, so random draws fill it in logical order:
    a channels-last batch gets the same random start as the contiguous one (``empty_like`` would
    keep the memory format and scatter the same draws to other pixels)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def init_linf(x: torch.Tensor, eps: float, project_fn: ProjectFn, boundaries: Boundaries) -> torch.Tensor:
    """Uniform random start in the L-inf ball (plus the original's +1e-5), projected."""
    x = x.detach()
    noise = _logical_order_empty(x).uniform_(-eps, eps)
    return project_fn(x, x + noise + INIT_OFFSET, eps, boundaries)


def init_l2(x: torch.Tensor, eps: float, project_fn: ProjectFn, boundaries: Boundaries) -> torch.Tensor:
    """Gaussian random start for L2, projected.

    Faithful quirk: the original called ``normal_(-eps, eps)``, whose arguments are (mean, std),
    so the noise has mean -eps (not 0) and std eps; +1e-5 is added as for L-inf.
    """
    x = x.detach()
    noise = _logical_order_empty(x).normal_(mean=-eps, std=eps)
    return project_fn(x, x + noise + INIT_OFFSET, eps, boundaries)


def _per_example(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-example vector [B] so it broadcasts against a [B, ...] tensor."""
    return t.view(-1, *([1] * (ndim - 1)))


def sign_direction(grad: torch.Tensor) -> torch.Tensor:
    """Steepest-ascent direction for L-inf: the sign of the gradient."""
    return grad.sign()


def l2_direction(grad: torch.Tensor) -> torch.Tensor:
    """Steepest-ascent direction for L2: the gradient scaled to unit norm per example."""
    norms = grad.flatten(1).norm(p=2, dim=1)
    return grad / (_per_example(norms, grad.dim()) + GRAD_NORM_EPS)


@dataclass(frozen=True)
class NormSpec:
    """Everything that changes with the threat model: random start, projection, step type."""
    init_fn: InitFn
    project_fn: ProjectFn
    take_sign: bool
    normalize: bool


_NORMS: Dict[str, NormSpec] = {
    "linf": NormSpec(init_linf, project_linf, take_sign=True, normalize=False),
    "l2": NormSpec(init_l2, project_l2, take_sign=False, normalize=True),
}


def get_norm(norm: str) -> NormSpec:
    """Look up a threat model by name ('linf' or 'l2'); unknown names raise ValueError."""
    key = norm.lower() if isinstance(norm, str) else norm
    if key not in _NORMS:
        raise ValueError(f"unknown attack norm '{norm}': choose one of {sorted(_NORMS)}")
    return _NORMS[key]


# --------------------------------------------------------------------------------------------
# PGD
# --------------------------------------------------------------------------------------------

def _check_budget(eps: float, steps: int, step_size: Optional[float] = None) -> None:
    if eps < 0:
        raise ValueError(f"attack eps must be >= 0, got {eps}")
    if steps < 0:
        raise ValueError(f"attack steps must be >= 0, got {steps}")
    if step_size is not None and step_size < 0:
        raise ValueError(f"attack step size must be >= 0, got {step_size}")
    if step_size == 0 and steps > 0 and eps > 0:
        # every iterate would stay at the random start: a noise baseline reported as a PGD-k number
        raise ValueError(f"attack step size 0 with {steps} steps and eps {eps:g} never moves from the random start; "
                         f"give a step size > 0 (or --attack-steps 0 for the random start alone)")


def _attack_loss(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, criterion: Criterion) -> torch.Tensor:
    """The criterion on log-probabilities, in float32 even when the model runs under autocast."""
    logits = model(x_adv)
    return criterion(F.log_softmax(logits.float(), dim=-1), y)


def pgd(model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        step_size: float,
        steps: int,
        boundaries: Boundaries,
        init_fn: InitFn,
        project_fn: ProjectFn,
        criterion: Criterion,
        targeted: bool = False,
        num_classes: Optional[int] = None,
        random_targets: bool = False,
        logits_y: bool = False,
        take_sign: bool = True,
        normalize: bool = False,
        dev_env: Any = None,
        return_losses: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Projected gradient descent (Madry et al.) from a random start; returns the last iterate.

    ``criterion`` is applied to ``log_softmax(model(x_adv))`` and ``y`` (NLL-sum for PGD
    training/evaluation, KL-sum with probability targets and ``logits_y=True`` for TRADES).
    Untargeted attacks ascend the loss, targeted ones descend it. With ``random_targets`` the
    labels are replaced by uniform random classes (which may equal the true class), as the
    original did. Soft (2-D) labels are reduced to their argmax unless ``logits_y``.

    The step direction is ``sign(g)`` if ``take_sign``, else ``g / ||g||_2`` per example if
    ``normalize``, else the raw gradient. ``dev_env.mark_step()`` is called after every
    iteration when available (cuts the XLA graph; a no-op elsewhere).

    Only input gradients are computed (``torch.autograd.grad``), nothing in the loop forces a
    host sync, and the model's train/eval mode is left as the caller set it. With
    ``return_losses`` it also returns a [steps] tensor of the loss at the start of each
    iteration (detached; convert it once, after the attack).
    """
    _check_budget(eps, steps, step_size)
    if eps == 0 and not model.training:
        # Nothing can move and, in eval mode, the forward passes change nothing: skip them. The
        # result is what the original's projection gives: x clamped into the boundaries.
        x_adv = x.detach().clamp(*boundaries)
        if not return_losses:
            return x_adv
        y = _attack_targets(y, num_classes, random_targets, logits_y)
        with torch.no_grad():
            loss = _attack_loss(model, x_adv, y, criterion).detach()
        return x_adv, loss.expand(steps).clone()
    # eps == 0 in train mode runs every forward pass, as the original did: BatchNorm statistics move.

    x_adv = init_fn(x, eps, project_fn, boundaries)
    y = _attack_targets(y, num_classes, random_targets, logits_y)
    mark_step = getattr(dev_env, "mark_step", None)
    losses = []
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        loss = _attack_loss(model, x_adv, y, criterion)
        grad, = torch.autograd.grad(loss, x_adv)
        if return_losses:
            losses.append(loss.detach())

        if take_sign:
            direction = sign_direction(grad)
        elif normalize:
            direction = l2_direction(grad)
        else:
            direction = grad
        if targeted:
            x_adv = x_adv.detach() - step_size * direction
        else:
            x_adv = x_adv.detach() + step_size * direction
        x_adv = project_fn(x, x_adv, eps, boundaries)

        if mark_step is not None:
            mark_step()

    x_adv = x_adv.detach()
    if return_losses:
        stacked = torch.stack(losses) if losses else torch.zeros(0, device=x.device)
        return x_adv, stacked
    return x_adv


def _attack_targets(y: torch.Tensor, num_classes: Optional[int], random_targets: bool,
                    logits_y: bool) -> torch.Tensor:
    """The labels the attack loss uses: random targets, or the argmax of soft labels."""
    if random_targets:
        if num_classes is None:
            raise ValueError("random_targets=True (targeted_pgd) needs num_classes")
        # One class per example (the original drew a tensor shaped like y, which for soft
        # labels was [B, C] and then argmax-ed; a uniform draw per example is what it meant).
        y = torch.randint(0, num_classes, (y.shape[0],), device=y.device)
    if y.dim() > 1 and not logits_y:
        y = y.argmax(dim=-1)
    return y


_ATTACKS: Dict[str, Callable[..., Any]] = {
    "pgd": pgd,
    "targeted_pgd": functools.partial(pgd, targeted=True, random_targets=True),
}
_AUTOATTACKS = ("apgd-ce", "autoattack")


def _get_attack(name: str) -> Callable[..., Any]:
    if name not in _ATTACKS:
        raise ValueError(f"unknown attack '{name}': choose one of {sorted(_ATTACKS) + list(_AUTOATTACKS)}")
    return _ATTACKS[name]


# --------------------------------------------------------------------------------------------
# Epsilon schedules (epoch-indexed, epoch 0-based)
# --------------------------------------------------------------------------------------------

def _constant_schedule(final_eps: float, period: int, zero_eps_epochs: int) -> EpsSchedule:
    # Like the original, the constant schedule ignores period and zero_eps_epochs.
    return lambda epoch: final_eps


def _linear_schedule(final_eps: float, period: int, zero_eps_epochs: int) -> EpsSchedule:
    def schedule(epoch: int) -> float:
        if epoch < zero_eps_epochs:
            return 0.0
        if epoch < period:
            # Divides by the period, not by (period - zero_eps_epochs): with zero-eps epochs
            # it jumps to the final eps at epoch == period (original formula).
            return (epoch - zero_eps_epochs) / period * final_eps
        return final_eps
    return schedule


def _sine_schedule(final_eps: float, period: int, zero_eps_epochs: int) -> EpsSchedule:
    def schedule(epoch: int) -> float:
        if epoch < zero_eps_epochs:
            return 0.0
        if epoch < period:
            return 0.5 * final_eps * (1 + math.sin(math.pi * ((epoch - zero_eps_epochs) / period - 0.5)))
        return final_eps
    return schedule


_SCHEDULES: Dict[str, Callable[[float, int, int], EpsSchedule]] = {
    "constant": _constant_schedule,
    "linear": _linear_schedule,
    "sine": _sine_schedule,
}


def eps_schedule(name: str, final_eps: float, period: int, zero_eps_epochs: int) -> EpsSchedule:
    """Return ``epoch -> eps`` for an eps warm-up schedule (formulas of the original).

    constant: ``final_eps`` every epoch. linear / sine: 0 for the first ``zero_eps_epochs``
    epochs, then a ramp reaching ``final_eps`` at epoch ``period``; ``period=0`` means no
    warm-up.
    """
    if name not in _SCHEDULES:
        raise ValueError(f"unknown eps schedule '{name}': choose one of {sorted(_SCHEDULES)}")
    if final_eps < 0:
        raise ValueError(f"final eps must be >= 0, got {final_eps}")
    if period < 0:
        raise ValueError(f"eps schedule period must be >= 0, got {period}")
    if zero_eps_epochs < 0:
        raise ValueError(f"zero-eps epochs must be >= 0, got {zero_eps_epochs}")
    return _SCHEDULES[name](final_eps, period, zero_eps_epochs)


# --------------------------------------------------------------------------------------------
# Factories
# --------------------------------------------------------------------------------------------

def _pgd_kwargs(norm: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Threat-model defaults (init, projection, step type), overridable by explicit kwargs."""
    spec = get_norm(norm)
    opts: Dict[str, Any] = dict(init_fn=spec.init_fn, project_fn=spec.project_fn,
                                take_sign=spec.take_sign, normalize=spec.normalize)
    opts.update(kwargs)
    return opts


def make_train_attack(attack_name: str, schedule: str, final_eps: float, period: int, zero_eps_epochs: int,
                      step_size: float, steps: int, norm: str, boundaries: Boundaries,
                      criterion: Criterion, num_classes: Optional[int], logits_y: bool,
                      **kwargs: Any) -> TrainAttackFn:
    """Training attack ``attack(model, x, y, epoch)`` whose eps follows the schedule.

    Faithful quirk: ``step_size`` stays fixed (it was computed from the final eps), so during
    warm-up the step can be larger than the current eps; projection keeps the result valid.
    """
    attack_fn = _get_attack(attack_name)
    _check_budget(final_eps, steps, step_size)
    schedule_fn = eps_schedule(schedule, final_eps, period, zero_eps_epochs)
    opts = _pgd_kwargs(norm, kwargs)

    def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        return attack_fn(model, x, y, schedule_fn(epoch), step_size=step_size, steps=steps,
                         boundaries=boundaries, criterion=criterion, num_classes=num_classes,
                         logits_y=logits_y, **opts)

    return attack


def make_attack(attack: str,
                eps: float,
                step_size: float,
                steps: int,
                norm: str,
                boundaries: Boundaries,
                criterion: Criterion,
                device: Optional[torch.device] = None,
                **kwargs: Any) -> AttackFn:
    """Evaluation attack ``attack(model, x, y) -> x_adv`` by name.

    ``pgd`` / ``targeted_pgd`` take any :func:`pgd` keyword (``num_classes``, ``dev_env``,
    ``return_losses``, ...). ``verbose`` and ``seed`` are accepted for every attack so callers
    can pass one set of kwargs; PGD has nothing to print and draws its random start from the
    global torch RNG (seeded by the scripts), so it does not use them.

    ``apgd-ce`` (APGD-CE, 5 restarts) and ``autoattack`` (standard AutoAttack) delegate to
    :mod:`src.autoattack`; they take ``verbose``, ``seed``, ``batch_size`` and ``num_classes``
    (too few classes for the version is a ValueError here, not in the first batch) and ignore the
    PGD-only ``step_size``, ``steps``, ``boundaries`` (AutoAttack clips to [0, 1]),
    ``criterion`` and ``dev_env``. The returned callable has ``flags`` /
    ``flag_counts`` attributes listing AutoAttack's sanity-check warnings.
    """
    _check_budget(eps, steps, step_size if attack not in _AUTOATTACKS else None)
    if attack in _AUTOATTACKS:
        from src.autoattack import make_autoattack

        kwargs.pop("dev_env", None)
        unknown = sorted(set(kwargs) - {"verbose", "seed", "batch_size", "num_classes"})
        if unknown:
            raise ValueError(f"{attack} does not take {unknown}; it accepts verbose, seed, batch_size, num_classes")
        if tuple(boundaries) != (0, 1):
            _logger.warning("%s always clips to [0, 1]; attack boundaries %s are not used",
                            attack, tuple(boundaries))
        version = "apgd-ce" if attack == "apgd-ce" else "standard"
        return make_autoattack(version, eps, norm, device=device, **kwargs)

    attack_fn = _get_attack(attack)
    kwargs.pop("verbose", None)
    kwargs.pop("seed", None)
    return functools.partial(attack_fn, eps=eps, step_size=step_size, steps=steps, boundaries=boundaries,
                             criterion=criterion, **_pgd_kwargs(norm, kwargs))


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclass
class AttackCfg:
    """One attack's threat model and budget, in input units (eps and step in [0, 1] units)."""
    name: str
    eps: float
    eps_schedule: str
    eps_schedule_period: int
    zero_eps_epochs: int
    step_size: float
    steps: int
    norm: str
    boundaries: Boundaries


def resolve_attack_cfg(args: argparse.Namespace, eval: bool = False) -> AttackCfg:
    """Turn CLI arguments (eps and step in /255 units) into an :class:`AttackCfg`.

    Training: name ``args.attack``, eps ``attack_eps / 255``. Evaluation (``eval=True``): the
    ``targeted_`` prefix is dropped (robust accuracy is measured untargeted) and eps is
    ``eval_attack_eps`` (if given) else ``attack_eps``, / 255. The step size is
    ``attack_lr / 255`` when given (in both modes, unlike the original's validate scripts),
    else ``1.5 * eps / steps`` with the eps of the respective mode (0 when steps is 0).
    Schedule fields fall back to a constant schedule so validate-style namespaces work.
    """
    name: str = args.attack
    eps_255 = args.attack_eps
    if eval:
        if name.startswith("targeted_"):
            name = name[len("targeted_"):]
        eval_eps = getattr(args, "eval_attack_eps", None)
        if eval_eps is not None:
            eps_255 = eval_eps
    if eps_255 is None or eps_255 < 0:
        raise ValueError(f"attack eps must be a number >= 0 (in /255 units), got {eps_255}")
    steps = int(args.attack_steps)
    if steps < 0:
        raise ValueError(f"attack steps must be >= 0, got {steps}")
    eps = eps_255 / 255
    attack_lr = getattr(args, "attack_lr", None)
    if attack_lr is not None:
        step_size = attack_lr / 255
    else:
        step_size = 1.5 * eps / steps if steps > 0 else 0.0
    lo, hi = getattr(args, "attack_boundaries", (0, 1))
    return AttackCfg(name=name,
                     eps=eps,
                     eps_schedule=getattr(args, "eps_schedule", "constant"),
                     eps_schedule_period=getattr(args, "eps_schedule_period", 0),
                     zero_eps_epochs=getattr(args, "zero_eps_epochs", 0),
                     step_size=step_size,
                     steps=steps,
                     norm=getattr(args, "attack_norm", "linf"),
                     boundaries=(float(lo), float(hi)))


def _train_attack_from_cfg(cfg: AttackCfg, criterion: Criterion, num_classes: Optional[int],
                           logits_y: bool, dev_env: Any) -> TrainAttackFn:
    return make_train_attack(cfg.name, cfg.eps_schedule, cfg.eps, cfg.eps_schedule_period,
                             cfg.zero_eps_epochs, cfg.step_size, cfg.steps, cfg.norm, cfg.boundaries,
                             criterion=criterion, num_classes=num_classes, logits_y=logits_y,
                             dev_env=dev_env)


# --------------------------------------------------------------------------------------------
# Training losses: nn.Modules with forward(model, x, y, epoch) -> (loss, clean_logits, adv_logits)
# --------------------------------------------------------------------------------------------

CLEAN_LOGITS_MODES = ("train", "nograd", "skip")


class AdvTrainingLoss(nn.Module):
    """PGD adversarial training (Madry et al.): the natural criterion on adversarial logits.

    ``eval_mode`` chooses the model mode while crafting: True (default) crafts in eval mode so
    BatchNorm statistics, dropout and drop-path do not move during the attack; False crafts in
    train mode (what the original did on TPUs).

    ``clean_logits`` chooses how the clean logits (used only for metrics) are computed:
    ``'train'`` (faithful default): a train-mode forward with a graph, which also updates
    BatchNorm statistics and costs one extra forward; ``'nograd'``: an eval-mode forward under
    ``torch.no_grad()`` (no graph, no BN update, returned detached); ``'skip'``: no clean
    forward at all, ``None`` is returned in its place.
    """

    def __init__(self,
                 attack_cfg: AttackCfg,
                 natural_criterion: nn.Module,
                 dev_env: Any = None,
                 num_classes: Optional[int] = None,
                 eval_mode: bool = True,
                 clean_logits: str = "train"):
        super().__init__()
        if clean_logits not in CLEAN_LOGITS_MODES:
            raise ValueError(f"clean_logits must be one of {CLEAN_LOGITS_MODES}, got '{clean_logits}'")
        self.criterion = natural_criterion
        self.attack = _train_attack_from_cfg(attack_cfg, nn.NLLLoss(reduction="sum"), num_classes,
                                             logits_y=False, dev_env=dev_env)
        self.eval_mode = eval_mode
        self.clean_logits = clean_logits

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                epoch: int) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        if self.eval_mode:
            model.eval()
        x_adv = self.attack(model, x, y, epoch)

        logits: Optional[torch.Tensor] = None
        if self.clean_logits == "nograd":
            model.eval()
            with torch.no_grad():
                logits = model(x).detach()
        model.train()
        if self.clean_logits == "train":
            logits = model(x)
        logits_adv = model(x_adv)
        loss = self.criterion(logits_adv, y)
        return loss, logits, logits_adv


class TRADESLoss(nn.Module):
    """TRADES (Zhang et al. 2019): natural loss + beta * KL(clean || adversarial) / batch.

    The attack maximizes KL-sum between the clean probabilities (computed once, without a
    graph, in the crafting mode) and the adversarial ones, starting from the usual uniform
    random start (not TRADES' 0.001 * N(0, 1)). As in the original TRADES code the clean
    distribution inside the loss is not detached, so the KL term also trains the clean branch.
    """

    def __init__(self,
                 attack_cfg: AttackCfg,
                 natural_criterion: nn.Module,
                 beta: float,
                 dev_env: Any = None,
                 num_classes: Optional[int] = None,
                 eval_mode: bool = True):
        super().__init__()
        if attack_cfg.name != "pgd":
            # Random targets would replace the clean probabilities the KL attack needs.
            raise ValueError(f"TRADES needs the untargeted 'pgd' attack, got '{attack_cfg.name}'")
        self.attack = _train_attack_from_cfg(attack_cfg, nn.KLDivLoss(reduction="sum"), num_classes,
                                             logits_y=True, dev_env=dev_env)
        self.natural_criterion = natural_criterion
        self.kl_criterion = nn.KLDivLoss(reduction="sum")
        self.beta = beta
        self.eval_mode = eval_mode

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                epoch: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch_size = x.size(0)
        if self.eval_mode:
            model.eval()
        with torch.no_grad():
            p_clean = F.softmax(model(x).float(), dim=-1)
        x_adv = self.attack(model, x, p_clean, epoch)

        model.train()
        logits = model(x)
        logits_adv = model(x_adv)
        loss_natural = self.natural_criterion(logits, y)
        loss_robust = (1.0 / batch_size) * self.kl_criterion(F.log_softmax(logits_adv.float(), dim=-1),
                                                             F.softmax(logits.float(), dim=-1))
        loss = loss_natural + self.beta * loss_robust
        return loss, logits, logits_adv
