"""Honest-evaluation checks: when a robust accuracy cannot be trusted, say so, and why.

"Beyond noise" (used by the attack-strength checks): a difference between two robust accuracies
measured on the same ``n`` examples is beyond noise when it exceeds one binomial standard error
``100 * sqrt(p * (1 - p) / n)`` percentage points of the weaker attack's robust accuracy ``p``, and
at least one example (``100 / n`` points).
"""
from __future__ import annotations

import math
from typing import Any, List, Mapping, Optional, Sequence

__all__ = ["PGD_ATTACKS", "FEW_STEPS", "binomial_se", "robust_above_clean_warnings", "attack_strength_warnings",
           "normalization_warnings", "gradient_warnings", "weak_attack_warnings", "nonfinite_warnings",
           "attack_setting_warnings", "example_count_warnings", "threat_model_warnings", "honesty_warnings"]

PGD_ATTACKS = ("pgd", "targeted_pgd")
# Below this many PGD steps robust accuracy is a loose upper bound (the paper reports AutoAttack).
FEW_STEPS = 10


def binomial_se(acc_percent: float, n: int) -> float:
    """One binomial standard error of an accuracy (in %) measured on ``n`` examples, in % points."""
    if n <= 0 or not math.isfinite(acc_percent):
        return float("nan")
    p = min(max(acc_percent / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1 - p) / n)


def _noise(acc_percent: float, n: int) -> float:
    """The "beyond noise" threshold: one binomial SE, and never less than one example."""
    return max(binomial_se(acc_percent, n), 100.0 / n)


def robust_above_clean_warnings(row: Mapping[str, Any]) -> List[str]:
    """Robust accuracy above clean accuracy on the same examples: the evaluation is broken.

    An attack can only remove correct predictions; more robust than clean means the model is
    randomized or stateful (train-mode dropout/BatchNorm, random input transforms), the attack is
    not maximizing the loss, or the attack's inputs differ from the clean ones (range/normalization).
    """
    out = []
    for k in ("1", "5"):
        clean, robust = row.get(f"top{k}"), row.get(f"robust_top{k}")
        if clean is None or robust is None or not (math.isfinite(clean) and math.isfinite(robust)):
            continue
        if robust > clean:
            out.append(f"robust top-{k} accuracy ({robust:.2f}%) is above clean top-{k} accuracy ({clean:.2f}%) on "
                       f"the same examples: an attack can only remove correct predictions, so the evaluation is "
                       f"broken -- a randomized or stateful model (dropout/BatchNorm in train mode, random "
                       f"defenses), an attack that does not maximize the loss, or inputs in the wrong range")
    return out


def attack_strength_warnings(rows: Sequence[Mapping[str, Any]], num_examples: int,
                             attack: str = "pgd") -> List[str]:
    """Compare PGD runs with different step counts on the same examples (rows need ``attack_steps``).

    * a stronger attack (more steps) scoring a HIGHER robust accuracy than a weaker one beyond noise
      (one binomial standard error of the weaker one's accuracy, at least one example): gradient
      masking / obfuscated gradients (the loss surface defeats longer optimization), a step size
      unsuited to the longer attack, or a randomized model;
    * robust accuracy still falling, beyond noise, between the two largest step counts: the attack
      has not converged (too few steps), so the reported number overstates robustness.
    """
    runs = sorted((int(r["attack_steps"]), float(r["robust_top1"])) for r in rows
                  if "attack_steps" in r and r.get("robust_top1") is not None and math.isfinite(r["robust_top1"]))
    if len(runs) < 2 or num_examples <= 0:
        return []
    out = []
    for i, (k_weak, acc_weak) in enumerate(runs):
        for k_strong, acc_strong in runs[i + 1:]:
            if k_strong == k_weak:
                continue
            thr = _noise(acc_weak, num_examples)
            if acc_strong - acc_weak > thr:
                out.append(f"{attack}-{k_strong} scored a HIGHER robust accuracy ({acc_strong:.2f}%) than the weaker "
                           f"{attack}-{k_weak} ({acc_weak:.2f}%) on the same {num_examples} examples, beyond noise "
                           f"(difference {acc_strong - acc_weak:.2f} > {thr:.2f} points, one binomial standard "
                           f"error): more optimization should never help the model -- suspect gradient masking / "
                           f"obfuscated gradients, a step size unsuited to the longer attack (--attack-lr), or a "
                           f"randomized model; confirm with AutoAttack")
    attacked = [r for r in runs if r[0] > 0]  # 0 steps is the random start only: no attack to converge
    if len(attacked) < 2:
        return out
    (k_a, acc_a), (k_b, acc_b) = attacked[-2], attacked[-1]
    thr = _noise(acc_a, num_examples)
    if k_a != k_b and acc_a - acc_b > thr:
        out.append(f"robust accuracy still falls from {attack}-{k_a} ({acc_a:.2f}%) to {attack}-{k_b} ({acc_b:.2f}%), "
                   f"beyond noise ({acc_a - acc_b:.2f} > {thr:.2f} points): the attack has not converged (too few "
                   f"steps), so {acc_b:.2f}% overstates robustness; try more steps, APGD-CE or AutoAttack")
    return out


def unchanged_by_attack_warnings(row: Mapping[str, Any], eps_255: Optional[float], num_examples: int,
                                 steps: Optional[int] = None) -> List[str]:
    """An attack with eps > 0 that changed no prediction of at least 20 correctly classified examples.

    Even strongly robust models lose some examples to a working attack; none lost usually means the
    attack did not run as meant: eps in the wrong units (--attack-eps is in /255), a zero or tiny step,
    outputs that are not logits, or gradient masking.
    """
    clean, robust = row.get("top1"), row.get("robust_top1")
    if steps == 0:  # PGD-0: the random start only, named by weak_attack_warnings
        return []
    if not eps_255 or eps_255 <= 0 or clean is None or robust is None or not math.isfinite(clean):
        return []
    if robust != clean or clean * num_examples / 100.0 < 20:
        return []
    return [f"the attack (eps {eps_255:g}/255) changed no prediction: robust accuracy equals clean accuracy "
            f"({clean:.2f}%) on {num_examples} examples. A working attack almost always breaks some; check the eps "
            f"units (--attack-eps is in /255), the step size (--attack-lr), and gradient masking (confirm with "
            f"AutoAttack)"]


def normalization_warnings(mode: str, attack: str, trained_inputs: Optional[str] = None) -> List[str]:
    """Mismatches between what the evaluated network receives and how it was trained.

    ``mode`` is the evaluation's normalization mode; ``trained_inputs`` what the checkpoint's
    network was trained on ('raw' [0, 1] pixels or 'normalized' inputs; None when unknown).
    """
    out = []
    if mode == "loader" and attack:
        out.append("the attack ran on loader-normalized inputs (the default mode, as in the original): the eps-ball "
                   "and the [0, 1] clipping were applied in normalized space, so eps is not in pixel units and the "
                   "robust accuracy is not comparable to published numbers; use --normalize-model (normalization "
                   "inside the model) or --no-normalize for a model trained on raw [0, 1] inputs")
    fed = {"loader": "normalized", "raw": "raw", "model": "normalized"}.get(mode)
    if trained_inputs is not None and fed is not None and trained_inputs != fed:
        if trained_inputs == "raw":
            out.append("the checkpoint's network was trained on raw [0, 1] inputs (its training arguments have "
                       "no_normalize and no normalize_model) but received normalized inputs here: clean and robust "
                       "accuracy are wrong; evaluate with --no-normalize")
        else:
            out.append("the checkpoint's network was trained on normalized inputs but received raw [0, 1] pixels "
                       "here: clean and robust accuracy are wrong; evaluate with --normalize-model (and the "
                       "training --mean/--std)")
    return out


def gradient_warnings(zero_grad_fraction: Optional[float]) -> List[str]:
    """Examples with an exactly zero input gradient: gradient attacks cannot move them."""
    if zero_grad_fraction is None or zero_grad_fraction <= 0:
        return []
    return [f"{100 * zero_grad_fraction:.0f}% of the examples of the first batch have an exactly zero input gradient: "
            f"gradient masking (a non-differentiable or quantizing input step, or a saturated softmax) -- PGD and "
            f"APGD cannot move them, so robust accuracy is overstated; check with a gradient-free attack "
            f"(AutoAttack's Square) or BPDA"]


def weak_attack_warnings(attack: str, steps: Sequence[int]) -> List[str]:
    """PGD with few steps only gives an upper bound on robust accuracy."""
    if attack not in PGD_ATTACKS or not steps or max(steps) >= FEW_STEPS:
        return []
    if max(steps) == 0:
        return [f"{attack} with 0 steps is no attack: the examples are the random start inside the eps-ball, so the "
                f"robust accuracy is (nearly) the clean accuracy; give --attack-steps 10 or more, APGD-CE or "
                f"AutoAttack"]
    return [f"{attack} with at most {max(steps)} steps is a weak attack: its robust accuracy is an upper bound "
            f"(too few steps); report APGD-CE or AutoAttack (the paper's numbers are AutoAttack)"]


def nonfinite_warnings(clean: int, adv: int, num_examples: int) -> List[str]:
    """Examples whose logits held NaN/inf: counted wrong, and said (their loss is NaN too)."""
    if not (clean or adv):
        return []
    parts = [f"{n} {what}" for n, what in ((clean, "clean"), (adv, "adversarial")) if n]
    return [f"the model returned NaN/inf logits for {' and '.join(parts)} of the {num_examples} examples: they are "
            f"counted as wrong (an argmax over NaN would pick an arbitrary class) and the mean losses are NaN; the "
            f"model overflows or divides by zero on these inputs -- check its numerics (float16?) before trusting "
            f"any number"]


def threat_model_warnings(outside: int, num_examples: int, threat: Optional[Sequence[Any]]) -> List[str]:
    """Adversarial examples the numbers were measured on that lie outside the attack's threat model.

    ``threat`` is ``(norm, eps, (lo, hi))`` in input units (``src.sanity.attack_threat_model``). The
    usual cause is clean pixels outside the attack's box, which every iterate is clipped into (a loader
    that normalizes, ``--attack-boundaries`` narrower than the data); an attack that does not project
    is the other. The counts stay as measured: the report says what they are.
    """
    if not outside or not threat:
        return []
    norm, eps, (lo, hi) = threat
    name = "L-inf" if str(norm).lower() == "linf" else "L2"
    return [f"{outside} of the {num_examples} adversarial examples lie outside the attack's threat model (farther "
            f"than eps {255 * eps:g}/255 in {name} from their clean image, or outside [{lo:g}, {hi:g}]): the robust "
            f"accuracy was measured on other images than this threat model allows, so it is not a robustness "
            f"number for it. Usually the clean pixels lie outside the attack's box and every iterate is clipped into "
            f"it (a loader that normalizes while the attack clips to [0, 1]: use --normalize-model; "
            f"--attack-boundaries narrower than the data)"]


def attack_setting_warnings(attack: str, norm: str = "linf", eps_255: Optional[float] = None,
                            step_255: Optional[float] = None, num_classes: Optional[int] = None) -> List[str]:
    """Attack settings that make the reported robust accuracy mean something else than it seems.

    * an L2 eps below 1/255 (``--attack-eps`` is in /255 units for L2 too): less than one gray level
      on a single pixel, almost surely pixel units given by mistake (RobustBench's L2 eps 0.5 is 127.5);
    * a PGD step (``--attack-lr``) above the ball's diameter 2 x eps: every step jumps across the
      ball, so PGD degenerates into repeated FGSM from the ball's boundary;
    * targeted PGD draws random targets that may equal the true class (as the original did): about
      1/C of the examples are pulled towards their own label and never attacked.
    """
    out = []
    if not attack:
        return out
    if str(norm).lower() == "l2" and eps_255 is not None and 0 < eps_255 < 1:
        out.append(f"L2 eps {eps_255:g}/255 = {eps_255 / 255:.4g} (in [0, 1] pixel units) is less than one gray level "
                   f"on a single pixel: --attack-eps is in /255 units for L2 too, so this attack barely perturbs the "
                   f"image; an L2 eps of 0.5 in pixel units (RobustBench's) is --attack-eps 127.5")
    if attack in PGD_ATTACKS and step_255 is not None and eps_255 is not None and 0 < 2 * eps_255 < step_255:
        out.append(f"the PGD step size {step_255:g}/255 (--attack-lr) is more than the eps-ball's diameter "
                   f"(2 x {eps_255:g}/255): every step jumps across the ball and is projected back onto its "
                   f"boundary, so PGD degenerates into repeated FGSM and its robust accuracy overstates robustness; "
                   f"use a step of at most eps (the default is 1.5 x eps / steps)")
    if attack == "targeted_pgd" and num_classes:
        out.append(f"targeted_pgd attacks random target classes that may equal the true class (as the original "
                   f"did): about 1 in {num_classes} examples ({100 / num_classes:.0f}%) is pulled towards its own "
                   f"label, so its robust accuracy is not an untargeted robustness number; report pgd, APGD-CE or "
                   f"AutoAttack")
    return out


def example_count_warnings(requested: Optional[int], evaluated: int, per_step: int) -> List[str]:
    """``--num-examples N`` that did not evaluate N examples (the results have no example-count column).

    ``per_step`` is the batch size times the number of processes: only whole steps are evaluated.
    """
    if requested is None or evaluated == requested:
        return []
    if evaluated == (requested // per_step) * per_step:
        why = (f"only whole batches are evaluated: {requested} // {per_step} (batch size x processes) = "
               f"{requested // per_step} batches")
    else:
        why = "the data holds fewer"
    return [f"evaluated {evaluated} examples, not the {requested} asked for with --num-examples ({why}); the "
            f"accuracies and their noise are those of {evaluated} examples"]


def honesty_warnings(rows: Sequence[Mapping[str, Any]], num_examples: int, *, attack: str = "",
                     steps: Sequence[int] = (), normalization_mode: str = "raw",
                     trained_inputs: Optional[str] = None, attack_flags: Sequence[str] = (),
                     zero_grad_fraction: Optional[float] = None, notes: Sequence[str] = (),
                     nonfinite: Sequence[int] = (0, 0), settings: Sequence[str] = (),
                     outside_threat: int = 0, threat: Optional[Sequence[Any]] = None) -> List[str]:
    """Every honesty warning of one evaluation run, de-duplicated, in a stable order.

    ``rows`` are result rows of the same examples (several when several ``--attack-steps`` ran);
    ``attack_flags`` are AutoAttack's own checks (``src.autoattack.attack_flags``); ``nonfinite``
    the examples with NaN/inf clean and adversarial logits; ``settings`` the warnings of
    :func:`attack_setting_warnings` and :func:`example_count_warnings`; ``outside_threat`` the
    adversarial examples outside ``threat`` (:func:`threat_model_warnings`).
    """
    out: List[str] = list(notes)
    out += list(settings)
    out += nonfinite_warnings(nonfinite[0], nonfinite[1], num_examples)
    out += threat_model_warnings(outside_threat, num_examples, threat)
    out += normalization_warnings(normalization_mode, attack, trained_inputs)
    for row in rows:
        out += robust_above_clean_warnings(row)
    out += attack_strength_warnings(rows, num_examples, attack or "pgd")
    out += gradient_warnings(zero_grad_fraction)
    out += weak_attack_warnings(attack, steps)
    out += [f"AutoAttack check: {f}" for f in attack_flags]
    return list(dict.fromkeys(out))
