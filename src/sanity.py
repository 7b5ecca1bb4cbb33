"""Checks that turn silently wrong numbers into clear errors: weights and input pixels.

A model whose weights hold NaN or inf still produces logits (NaN ones, so the argmax is class 0
and the accuracy is the share of class 0, about 10% on a balanced 10-class set), and an attack
still runs on pixels outside its box or on NaN pixels. Nothing crashes, the numbers are wrong.
These functions are called where weights are loaded for evaluation or export and on the first
batch an evaluation sees.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch

from src.errors import CheckpointError, UsageError

_logger = logging.getLogger("robust_vits")

__all__ = ["check_finite_state_dict", "attack_boundaries", "attack_threat_model", "outside_threat_model",
           "check_input_batch", "NonFiniteInputError",
           "ModelOutputError", "check_logits", "probe_model_outputs", "predicted_classes"]


class NonFiniteInputError(UsageError):
    """An evaluation batch holds NaN or inf pixels: every number computed from it would be meaningless."""


def check_finite_state_dict(state_dict: Mapping[str, Any], source: str) -> None:
    """Raise ``CheckpointError`` naming the first floating-point tensor with a NaN or inf value.

    Integer tensors (``num_batches_tracked``, index buffers) cannot hold either and are skipped.
    One ``aminmax`` reduction per tensor (NaN propagates into both ends, inf shows at one), which
    allocates nothing: 20x faster than ``isfinite().all()`` on a CPU.
    """
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.is_complex()):
            continue
        if value.device.type == "meta" or value.numel() == 0:
            continue
        if not _all_finite(value):
            nan = int(torch.isnan(value).sum())
            inf = int(torch.isinf(value).sum())
            kinds = " and ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "inf")) if n)
            raise CheckpointError(f"checkpoint {source} holds non-finite weights: tensor '{key}' has {kinds} of its "
                                  f"{value.numel()} values; a diverged or "
                                  f"damaged run wrote it; use an earlier checkpoint")


def _all_finite(value: torch.Tensor) -> bool:
    flat = torch.view_as_real(value) if value.is_complex() else value
    lo, hi = torch.aminmax(flat.detach())
    return bool(lo > -float("inf")) and bool(hi < float("inf"))  # NaN compares False


def attack_boundaries(attack: Any) -> Optional[Tuple[float, float]]:
    """The pixel box ``(lo, hi)`` an evaluation attack keeps its inputs in, or None without an attack.

    PGD attacks from ``src.attacks.make_attack`` are ``functools.partial`` objects carrying
    ``boundaries``; AutoAttack (and APGD-CE) always clip to [0, 1]; an object may also say it
    itself with a ``boundaries`` attribute.
    """
    if attack is None:
        return None
    own = getattr(attack, "boundaries", None)
    if own is None and isinstance(attack, functools.partial):
        own = attack.keywords.get("boundaries")
    lo, hi = own if own is not None else (0.0, 1.0)
    return float(lo), float(hi)


def attack_threat_model(attack: Any) -> Optional[Tuple[str, float, Tuple[float, float]]]:
    """``(norm, eps, (lo, hi))`` of an evaluation attack (eps in input units), or None when it cannot be told.

    PGD attacks from ``src.attacks.make_attack`` are ``functools.partial`` objects carrying ``eps`` and
    their projection (which names the norm); the AutoAttack adapter has ``eps`` and ``norm`` attributes.
    """
    if attack is None:
        return None
    eps, norm = getattr(attack, "eps", None), getattr(attack, "norm", None)
    if isinstance(attack, functools.partial):
        from src.attacks import project_l2, project_linf

        eps = attack.keywords.get("eps", eps)
        project = attack.keywords.get("project_fn")
        norm = "linf" if project is project_linf else "l2" if project is project_l2 else None
    norm = str(norm).lower() if norm is not None else None
    if eps is None or norm not in ("linf", "l2"):
        return None
    return norm, float(eps), attack_boundaries(attack)


def outside_threat_model(x: torch.Tensor, x_adv: torch.Tensor, threat: Tuple[str, float, Tuple[float, float]]
                         ) -> torch.Tensor:
    """Per example: is the crafted input outside the threat model -- farther than eps from its clean image
    (in the threat model's norm), outside the box, or not finite? (bool tensor on the inputs' device, no sync)

    The tolerance (1e-6 + 1e-4 x eps) only absorbs float32 rounding of the projections.
    """
    norm, eps, (lo, hi) = threat
    adv = x_adv.detach().float().flatten(1)
    delta = adv - x.detach().float().flatten(1)
    dist = delta.abs().amax(dim=1) if str(norm).lower() == "linf" else delta.norm(p=2, dim=1)
    tol = 1e-6 + 1e-4 * eps
    inside = (dist <= eps + tol) & (adv >= lo - 1e-6).all(dim=1) & (adv <= hi + 1e-6).all(dim=1)
    return ~(inside & torch.isfinite(adv).all(dim=1))  # NaN compares False: outside


def check_input_batch(x: torch.Tensor, attack: Any = None, where: str = "the first evaluation batch") -> None:
    """Refuse NaN/inf pixels; warn once when pixels lie outside the attack's box.

    NaN or inf pixels are an error (``NonFiniteInputError``): the loss, the predictions and the
    attack's gradients are undefined. Pixels outside ``[lo, hi]`` of the attack are a warning
    naming the range seen: the attack projects its iterates into the box, so it perturbs a
    clipped image, not the one the clean accuracy was measured on. The usual cause is a loader
    that normalizes (values around [-2.1, 2.6]) while the model expects [0, 1] inputs and
    normalizes inside itself (``--normalize-model``).
    """
    if not torch.is_tensor(x) or not x.is_floating_point() or x.numel() == 0:
        return
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise NonFiniteInputError(f"{where} holds {bad} NaN/inf pixel value(s) of {x.numel()}: the data (or its "
                                  f"transform) is broken; results on it would be meaningless")
    box = attack_boundaries(attack)
    if box is None:
        return
    lo_seen, hi_seen = float(x.min()), float(x.max())
    lo, hi = box
    tol = 1e-6
    if lo_seen < lo - tol or hi_seen > hi + tol:
        _logger.warning("the attack keeps inputs in [%g, %g] but %s has pixels in [%.4g, %.4g]: the attack will "
                        "clip them, so robust accuracy is measured on other images than clean accuracy. The usual "
                        "cause is a loader that normalizes while the model expects [0, 1] inputs (use "
                        "--normalize-model) or --attack-boundaries that do not match the data", lo, hi, where,
                        lo_seen, hi_seen)


class ModelOutputError(UsageError):
    """The model's output is not one logit vector per example: no accuracy or attack loss is defined."""


def check_logits(out: Any, batch: int, num_classes: Optional[int] = None) -> torch.Tensor:
    """``out`` if it is a floating tensor ``[batch, classes]`` (with ``num_classes`` classes when given).

    A tuple or dict (timm's distilled DeiT in train mode, a model returning features and logits),
    a 1-D or 4-D tensor, or integer outputs would otherwise end in a traceback from ``.float()`` or
    ``topk`` -- or, for a ``[B, D]`` feature vector, in an accuracy over the wrong columns.
    """
    what = f"a {type(out).__name__}" if not torch.is_tensor(out) else \
        f"a {str(out.dtype).replace('torch.', '')} tensor of shape {list(out.shape)}"
    if not torch.is_tensor(out) or not out.is_floating_point() or out.dim() != 2 or out.shape[0] != batch:
        raise ModelOutputError(f"the model returns {what} for a batch of {batch}; evaluation needs one floating-point "
                               f"logit vector per example (a [{batch}, classes] tensor): wrap the model so that "
                               f"forward() returns the class logits")
    if num_classes is not None and out.shape[1] != num_classes:
        raise ModelOutputError(f"the model returns {out.shape[1]} logits per example but predicts {num_classes} "
                               f"classes (its num_classes); check --num-classes and the model")
    return out


def _state_snapshot(model: torch.nn.Module) -> Tuple[dict, torch.Tensor]:
    """Copies of every buffer (small) and a float32 (sum, sum of squares) per parameter (no copy of the
    weights): enough to tell whether running the model changed it."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if b is not None}
    sums = [torch.stack([p.detach().float().sum(), p.detach().float().square().sum()])
            for _, p in model.named_parameters()]
    return buffers, (torch.stack(sums) if sums else torch.zeros(0, 2))


def _changed_state(model: torch.nn.Module, before: Tuple[dict, torch.Tensor]) -> List[str]:
    """Names of the buffers and parameters that differ from ``before`` (NaN-aware exact comparison)."""
    buffers, sums = before
    now = dict(model.named_buffers())
    changed = [name for name, old in buffers.items()
               if name in now and not torch.equal(now[name].detach().nan_to_num(), old.nan_to_num())]
    params = [name for name, _ in model.named_parameters()]
    _, sums_now = _state_snapshot(model) if params else ({}, sums)
    changed += [params[i] for i in range(len(params))
                if not torch.equal(sums_now[i].nan_to_num(), sums[i].nan_to_num())]
    return changed


def _restore_state(model: torch.nn.Module, buffers: dict, params: dict, changed: Sequence[str]) -> None:
    """Put back every buffer, and the parameters among ``changed`` (from their host copies in ``params``)."""
    now = dict(model.named_buffers())
    now_params = dict(model.named_parameters())
    with torch.no_grad():
        for name, old in buffers.items():
            if name in now and now[name] is not None:
                now[name].copy_(old)
        for name in changed:
            if name in params and name in now_params:
                now_params[name].copy_(params[name])


def probe_model_outputs(model: torch.nn.Module, input_size: Any, num_classes: Optional[int], device: Any,
                        autocast: Any = None) -> List[str]:
    """One probe before any evaluation: what the model returns, and whether it can be attacked honestly.

    Forwards of the same four random [0, 1] images: outputs that are not ``[4, classes]`` logits are
    an error (``check_logits``); these give honesty notes, which are returned:

    * two forwards of the batch that differ: a randomized model (a random defense, dropout forced on);
    * the batch differing from its two halves run apart: predictions depend on the other examples of
      the batch (BatchNorm using batch statistics -- left in train mode, or ``track_running_stats=False``
      -- or another test-time adaptation), so clean and robust accuracy depend on the batch size and
      order, and the attack perturbs every example of the batch at once;
    * buffers or parameters changed by the forwards: a stateful model (BatchNorm running statistics
      updated in eval mode, a defense that adapts to its inputs), whose numbers depend on what it saw
      before -- the attack's queries included; the probe puts the buffers and parameters back;
    * probabilities (non-negative rows summing to 1): the report's losses are not cross-entropies and
      softmax saturation weakens gradient attacks.

    The model is used in the mode it is in (eval).
    """
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, *tuple(input_size), generator=g).to(device)
    ctx = autocast if autocast is not None else torch.autocast("cpu", enabled=False)
    before = _state_snapshot(model)
    # host copies of the weights, so that a model that changes them when it runs (a defense that trains at test
    # time) is evaluated from its own weights, not from what the probe's random images made of them
    params_before = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}
    changed: List[str] = []

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        """One forward from the model's initial state (a stateful model is judged on its state alone)."""
        now_changed: List[str] = []
        try:
            with torch.no_grad(), ctx:
                out = check_logits(model(inputs), inputs.shape[0], num_classes).float()
            now_changed = _changed_state(model, before)
            changed.extend(n for n in now_changed if n not in changed)
        except BaseException:
            now_changed = list(params_before)  # an error part-way: put every weight back
            raise
        finally:
            _restore_state(model, before[0], params_before, now_changed)
        return out

    a, b = forward(x), forward(x)
    halves = torch.cat([forward(x[:2]), forward(x[2:])])
    notes: List[str] = []
    all_finite = all(bool(torch.isfinite(t).all()) for t in (a, b, halves))
    if all_finite:
        scale = float(a.abs().max()) + 1e-6
        randomized = float((a - b).abs().max()) > 1e-3 * scale
        if randomized:
            notes.append("the model is randomized: two forward passes on the same inputs gave different logits "
                         "(a random defense, or dropout/noise active in eval mode). PGD and APGD without "
                         "expectation over transformation (EOT) overstate the robustness of such a model; its clean "
                         "and robust accuracy also change from run to run")
        elif float((a - halves).abs().max()) > 1e-2 * scale:  # 1e-2: batch-size dependent kernels round apart
            notes.append("the model's predictions depend on the other examples of the batch: a batch of 4 and its "
                         "two halves run apart gave different logits (BatchNorm using batch statistics -- left in "
                         "train mode or without running statistics -- or test-time adaptation). Clean and robust "
                         "accuracy then change with the batch size and order, and the attack perturbs the whole "
                         "batch at once; evaluate the model in eval mode with running statistics")
        if a.shape[1] > 1 and bool((a >= 0).all()) and float((a.sum(dim=1) - 1).abs().max()) < 1e-3:
            notes.append("the model's outputs look like probabilities (non-negative, each row sums to 1), not "
                         "logits: the reported losses are not cross-entropies, and the softmax the attack applies "
                         "on top saturates its gradients, so gradient attacks are weakened; return the logits")
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        notes.append(f"the model changes its own state when it runs: forward passes in eval mode changed {shown} "
                     f"(BatchNorm running statistics updated -- a layer left in train mode -- or a defense that "
                     f"adapts to its inputs). Its numbers depend on everything it saw before, the attack's queries "
                     f"included, and change with the evaluation order")
    return notes


def predicted_classes(logits: torch.Tensor) -> torch.Tensor:
    """``argmax`` per row, and -1 (no class: never equal to a label) for rows holding a NaN or inf: ``argmax``
    returns the NaN's index, so a diverging model's examples of that class would count as correct."""
    pred = logits.argmax(dim=-1)
    return torch.where(torch.isfinite(logits).all(dim=-1), pred, torch.full_like(pred, -1))
