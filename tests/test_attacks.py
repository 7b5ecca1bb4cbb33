"""Tests for src/attacks.py and src/autoattack.py.

Tiny models (a linear layer or a 2-layer conv net on 3x8x8 images) keep the whole file fast on
two CPU cores. Property tests are derandomized so a failure reproduces exactly.
"""
import argparse
import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from src import attacks
from src.attacks import (AdvTrainingLoss, AttackCfg, TRADESLoss, eps_schedule, init_l2, init_linf, l2_direction,
                         make_attack, make_train_attack, pgd, project_l2, project_linf, resolve_attack_cfg)
from src.autoattack import (AutoAttackFn, TRAIN_MODE_FLAG, attack_flags, autoattack_norm, make_autoattack,
                            run_autoattack)

PROPERTY = settings(max_examples=15, deadline=None, derandomize=True)
SHAPE = (3, 8, 8)
NUM_CLASSES = 10
NLL_SUM = nn.NLLLoss(reduction="sum")


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), NUM_CLASSES)).eval()


def conv_model(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 4, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
               nn.Linear(4 * 4 * 4, NUM_CLASSES)]
    return nn.Sequential(*layers).eval()


def make_model(kind: str, seed: int) -> nn.Module:
    return linear_model(seed) if kind == "linear" else conv_model(seed)


def batch(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return x, y


def norm_fns(norm: str):
    spec = attacks.get_norm(norm)
    return dict(init_fn=spec.init_fn, project_fn=spec.project_fn, take_sign=spec.take_sign,
                normalize=spec.normalize)


def summed_ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="sum").item()


def assert_in_threat_model(x_adv, x, eps, norm, boundaries=(0.0, 1.0)):
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max().item() <= eps + 1e-6
    else:
        assert delta.norm(dim=1).max().item() <= eps * (1 + 1e-5) + 1e-6
    lo, hi = (torch.tensor(b, dtype=x_adv.dtype) for b in boundaries)  # bounds as the tensor stores them
    assert x_adv.min() >= lo and x_adv.max() <= hi


def namespace(**overrides) -> argparse.Namespace:
    args = dict(attack="pgd", attack_eps=4, eval_attack_eps=None, attack_lr=None, attack_steps=10,
                attack_norm="linf", attack_boundaries=(0, 1), eps_schedule="constant", eps_schedule_period=10,
                zero_eps_epochs=0)
    args.update(overrides)
    return argparse.Namespace(**args)


def bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def same_state(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------
# eps schedules (original-behaviour.md section 2.3)
# ------------------------------------------------------------------------------------------

E = 8 / 255


@pytest.mark.parametrize("period", [0, 5, 10])
@pytest.mark.parametrize("zero", [0, 2])
def test_constant_schedule_is_final_eps_every_epoch(period, zero):
    sched = eps_schedule("constant", E, period, zero)
    assert [sched(e) for e in range(15)] == [E] * 15


LINEAR_PINNED = {
    # (period, zero): {epoch: eps / E}
    (10, 0): {0: 0.0, 1: 0.1, 5: 0.5, 9: 0.9, 10: 1.0, 14: 1.0},
    (10, 2): {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.1, 9: 0.7, 10: 1.0, 11: 1.0},  # jumps 0.7 -> 1 at P
    (5, 0): {0: 0.0, 2: 0.4, 4: 0.8, 5: 1.0},
    (5, 2): {1: 0.0, 2: 0.0, 4: 0.4, 5: 1.0},
    (0, 0): {0: 1.0, 1: 1.0, 7: 1.0},
    (0, 2): {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0},  # zero-eps epochs come first, as in the original
}


@pytest.mark.parametrize("period,zero", list(LINEAR_PINNED))
def test_linear_schedule_pinned(period, zero):
    sched = eps_schedule("linear", E, period, zero)
    for epoch, frac in LINEAR_PINNED[(period, zero)].items():
        assert sched(epoch) == pytest.approx(frac * E, abs=1e-12), epoch


def _sine_reference(e, period, zero):
    if e < zero:
        return 0.0
    if e < period:
        return 0.5 * E * (1 + math.sin(math.pi * ((e - zero) / period - 0.5)))
    return E


@pytest.mark.parametrize("period", [0, 5, 10])
@pytest.mark.parametrize("zero", [0, 2])
def test_sine_schedule_formula(period, zero):
    sched = eps_schedule("sine", E, period, zero)
    for e in range(14):
        assert sched(e) == pytest.approx(_sine_reference(e, period, zero), abs=1e-12)


def test_sine_schedule_pinned_values():
    sched = eps_schedule("sine", E, 10, 0)
    assert sched(0) == pytest.approx(0.0, abs=1e-12)
    assert sched(5) == pytest.approx(0.5 * E)
    assert sched(10) == E
    sched = eps_schedule("sine", E, 10, 2)
    assert sched(1) == 0.0 and sched(2) == pytest.approx(0.0, abs=1e-12)
    assert sched(7) == pytest.approx(0.5 * E)
    assert sched(9) == pytest.approx(0.5 * E * (1 + math.sin(math.pi * 0.2)))


@pytest.mark.parametrize("args,match", [
    (("cosine", E, 10, 0), "unknown eps schedule 'cosine'"),
    (("linear", -1.0, 10, 0), "eps must be >= 0"),
    (("linear", E, -1, 0), "period must be >= 0"),
    (("linear", E, 10, -1), "zero-eps epochs must be >= 0"),
])
def test_schedule_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        eps_schedule(*args)


# ------------------------------------------------------------------------------------------
# resolve_attack_cfg (original tests 1, 3, 4 and the decided /255 attack_lr)
# ------------------------------------------------------------------------------------------

def test_resolve_attack_cfg_train():
    cfg = resolve_attack_cfg(namespace(attack_eps=4, attack_steps=10))
    assert cfg.name == "pgd"
    assert cfg.eps == 4 / 255
    assert cfg.step_size == 1.5 * cfg.eps / 10
    assert (cfg.eps_schedule, cfg.eps_schedule_period, cfg.zero_eps_epochs) == ("constant", 10, 0)
    assert cfg.boundaries == (0.0, 1.0) and cfg.norm == "linf" and cfg.steps == 10


@pytest.mark.parametrize("eval_mode", [False, True])
def test_resolve_attack_cfg_attack_lr_is_in_255_units(eval_mode):
    cfg = resolve_attack_cfg(namespace(attack_lr=15), eval=eval_mode)
    assert cfg.step_size == 15 / 255


def test_resolve_attack_cfg_eval_eps():
    args = namespace(attack_eps=4, eval_attack_eps=8, attack_steps=10)
    cfg = resolve_attack_cfg(args, eval=True)
    assert cfg.eps == 8 / 255
    assert cfg.step_size == 1.5 * cfg.eps / 10
    assert resolve_attack_cfg(args).eps == 4 / 255  # training keeps --attack-eps


def test_resolve_attack_cfg_eval_eps_zero_is_honoured():
    assert resolve_attack_cfg(namespace(attack_eps=4, eval_attack_eps=0), eval=True).eps == 0.0


def test_resolve_attack_cfg_eval_name():
    args = namespace(attack="targeted_pgd")
    assert resolve_attack_cfg(args, eval=True).name == "pgd"
    assert resolve_attack_cfg(args).name == "targeted_pgd"


def test_resolve_attack_cfg_zero_steps_has_zero_step_size():
    assert resolve_attack_cfg(namespace(attack_steps=0)).step_size == 0.0


def test_resolve_attack_cfg_validate_style_namespace():
    args = argparse.Namespace(attack="pgd", attack_eps=8, attack_lr=None, attack_steps=4, attack_norm="l2",
                              attack_boundaries=(0, 1))
    cfg = resolve_attack_cfg(args, eval=True)
    assert cfg.eps == 8 / 255 and cfg.norm == "l2" and cfg.eps_schedule == "constant"


def test_resolve_attack_cfg_rejects_negative():
    with pytest.raises(ValueError, match="eps"):
        resolve_attack_cfg(namespace(attack_eps=-1))
    with pytest.raises(ValueError, match="steps"):
        resolve_attack_cfg(namespace(attack_steps=-1))


# ------------------------------------------------------------------------------------------
# make_train_attack / make_attack
# ------------------------------------------------------------------------------------------

def test_train_attack_eps_follows_schedule_with_fixed_step(monkeypatch):
    calls = []

    def recorder(model, x, y, eps, **kw):
        calls.append((eps, kw["step_size"], kw["steps"]))
        return x

    monkeypatch.setitem(attacks._ATTACKS, "pgd", recorder)
    final_eps, step = 8 / 255, 1.5 * (8 / 255) / 2
    attack = make_train_attack("pgd", "linear", final_eps, 10, 0, step, 2, "linf", (0, 1),
                               criterion=NLL_SUM, num_classes=NUM_CLASSES, logits_y=False)
    x, y = batch(0)
    for epoch in range(12):
        attack(None, x, y, epoch)
    assert [c[0] for c in calls] == pytest.approx([min(e / 10, 1.0) * final_eps for e in range(12)])
    assert {c[1] for c in calls} == {step}  # the step size does not shrink with the warmed-up eps
    assert {c[2] for c in calls} == {2}


def test_train_attack_epoch_zero_of_linear_warmup_is_clean():
    model = linear_model()
    x, y = batch(1)
    attack = make_train_attack("pgd", "linear", 8 / 255, 10, 0, 0.01, 2, "linf", (0, 1),
                               criterion=NLL_SUM, num_classes=NUM_CLASSES, logits_y=False)
    assert torch.equal(attack(model, x, y, 0), x)
    assert not torch.equal(attack(model, x, y, 5), x)


@pytest.mark.parametrize("kwargs,match", [
    (dict(attack="fgsm"), "unknown attack 'fgsm'.*pgd.*targeted_pgd.*apgd-ce.*autoattack"),
    (dict(norm="l1"), "unknown attack norm 'l1'.*l2.*linf"),
    (dict(eps=-0.1), "eps must be >= 0"),
    (dict(steps=-1), "steps must be >= 0"),
])
def test_make_attack_rejects_bad_input(kwargs, match):
    args = dict(attack="pgd", eps=0.1, step_size=0.01, steps=2, norm="linf", boundaries=(0, 1), criterion=NLL_SUM)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        make_attack(**args)


def test_make_train_attack_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown attack"):
        make_train_attack("fgsm", "constant", 0.1, 0, 0, 0.01, 1, "linf", (0, 1), NLL_SUM, 10, False)
    with pytest.raises(ValueError, match="unknown eps schedule"):
        make_train_attack("pgd", "step", 0.1, 0, 0, 0.01, 1, "linf", (0, 1), NLL_SUM, 10, False)


def test_make_attack_pgd_accepts_shared_eval_kwargs():
    model = linear_model()
    x, y = batch(2)
    attack = make_attack("pgd", 0.05, 0.02, 2, "l2", (0, 1), NLL_SUM, num_classes=NUM_CLASSES, dev_env=None,
                         verbose=True, seed=0)
    assert_in_threat_model(attack(model, x, y), x, 0.05, "l2")


# ------------------------------------------------------------------------------------------
# PGD properties
# ------------------------------------------------------------------------------------------

@PROPERTY
@given(seed=st.integers(0, 10_000), norm=st.sampled_from(["linf", "l2"]), kind=st.sampled_from(["linear", "conv"]),
       eps=st.floats(1e-3, 1.0), steps=st.integers(0, 3), step_frac=st.floats(0.1, 2.0), n=st.integers(1, 4),
       attack=st.sampled_from(["pgd", "targeted_pgd"]))
def test_pgd_stays_in_eps_ball_and_box(seed, norm, kind, eps, steps, step_frac, n, attack):
    model = make_model(kind, seed)
    x, y = batch(seed, n)
    fn = make_attack(attack, eps, step_frac * eps, steps, norm, (0, 1), NLL_SUM, num_classes=NUM_CLASSES)
    x_adv = fn(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert_in_threat_model(x_adv, x, eps, norm)


@PROPERTY
@given(seed=st.integers(0, 10_000), lo=st.floats(0.1, 0.4), hi=st.floats(0.6, 0.9), norm=st.sampled_from(["linf", "l2"]))
def test_pgd_respects_custom_boundaries(seed, lo, hi, norm):
    model = conv_model(seed)
    x, y = batch(seed)
    x = x.clamp(lo, hi)
    x_adv = make_attack("pgd", 0.3, 0.1, 2, norm, (lo, hi), NLL_SUM)(model, x, y)
    assert_in_threat_model(x_adv, x, 0.3, norm, boundaries=(lo, hi))


@PROPERTY
@given(seed=st.integers(0, 10_000), norm=st.sampled_from(["linf", "l2"]), steps=st.integers(0, 3),
       attack=st.sampled_from(["pgd", "targeted_pgd"]))
def test_pgd_eps_zero_returns_x_exactly(seed, norm, steps, attack):
    model = conv_model(seed)
    x, y = batch(seed)
    x_adv = make_attack(attack, 0.0, 0.01, steps, norm, (0, 1), NLL_SUM, num_classes=NUM_CLASSES)(model, x, y)
    assert torch.equal(x_adv, x) and x_adv.data_ptr() != x.data_ptr()


def test_pgd_eps_zero_with_losses_reports_the_clean_loss():
    model = linear_model()
    x, y = batch(3)
    x_adv, losses = pgd(model, x, y, 0.0, 0.01, 3, (0, 1), criterion=NLL_SUM, return_losses=True,
                        **norm_fns("linf"))
    assert torch.equal(x_adv, x)
    assert losses.shape == (3,)
    assert torch.allclose(losses, torch.full((3,), summed_ce(model, x, y)))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_eps_zero_in_train_mode_runs_the_forward_passes(norm):
    """As the original: crafting in train mode with eps 0 still runs each step's forward pass, so
    BatchNorm running statistics move (one update per step); the input comes back unchanged."""
    model = conv_model(1, bn=True).train()
    x, y = batch(1)
    before = bn_state(model)
    x_adv = make_attack("pgd", 0.0, 0.01, 3, norm, (0, 1), NLL_SUM)(model, x, y)
    assert torch.equal(x_adv, x)
    assert not same_state(before, bn_state(model))
    assert int(model[1].num_batches_tracked) == 3


@pytest.mark.parametrize("train_mode", [False, True])
def test_pgd_eps_zero_clamps_into_the_boundaries(train_mode):
    """The original's projection clamps even a zero perturbation into [lo, hi]."""
    model = conv_model(2, bn=True).train(train_mode)
    x, y = batch(2)
    x = x * 1.4 - 0.2  # partly outside [0, 1]
    x_adv = make_attack("pgd", 0.0, 0.01, 2, "linf", (0, 1), NLL_SUM)(model, x, y)
    assert torch.equal(x_adv, x.clamp(0, 1))


@PROPERTY
@given(seed=st.integers(0, 10_000), norm=st.sampled_from(["linf", "l2"]), eps=st.floats(1e-3, 0.5))
def test_pgd_zero_steps_returns_projected_random_start(seed, norm, eps):
    model = conv_model(seed)
    x, y = batch(seed)
    fns = norm_fns(norm)
    torch.manual_seed(seed)
    expected = fns["init_fn"](x, eps, fns["project_fn"], (0, 1))
    torch.manual_seed(seed)
    x_adv, losses = pgd(model, x, y, eps, 0.1, 0, (0, 1), criterion=NLL_SUM, return_losses=True, **fns)
    assert torch.equal(x_adv, expected)
    assert losses.shape == (0,)
    assert_in_threat_model(x_adv, x, eps, norm)


@PROPERTY
@given(seed=st.integers(0, 10_000), norm=st.sampled_from(["linf", "l2"]), steps=st.integers(1, 4))
def test_untargeted_pgd_does_not_lower_the_loss_of_a_convex_model(seed, norm, steps):
    # Summed CE of a linear model is convex in x; a sign step followed by the exact L-inf
    # projection (or a normalized step followed by the L2-ball projection, box inactive) can then
    # never decrease it, so every iterate is at least as bad for the model as the random start.
    model = linear_model(seed)
    x, y = batch(seed)
    eps = 0.1 if norm == "linf" else 0.5
    boundaries = (0, 1) if norm == "linf" else (-10, 10)
    x_adv, losses = pgd(model, x, y, eps, eps / 4, steps, boundaries, criterion=NLL_SUM, return_losses=True,
                        **norm_fns(norm))
    assert losses.shape == (steps,) and not losses.requires_grad
    trajectory = losses.tolist() + [summed_ce(model, x_adv, y)]
    tol = 1e-4 * max(1.0, abs(trajectory[0]))
    assert all(b >= a - tol for a, b in zip(trajectory, trajectory[1:])), trajectory
    assert trajectory[-1] > trajectory[0]


@PROPERTY
@given(seed=st.integers(0, 10_000), norm=st.sampled_from(["linf", "l2"]), kind=st.sampled_from(["linear", "conv"]))
def test_targeted_pgd_lowers_the_target_class_loss(seed, norm, kind):
    model = make_model(kind, seed)
    x, _ = batch(seed)
    with torch.no_grad():
        target = model(x).argmin(dim=1)  # least likely class: a clearly positive loss to lower
    eps = 0.1 if norm == "linf" else 1.0
    x_adv = pgd(model, x, target, eps, eps / 4, 5, (0, 1), criterion=NLL_SUM, targeted=True, **norm_fns(norm))
    assert summed_ce(model, x_adv, target) < summed_ce(model, x, target)


def test_random_targets_need_num_classes():
    model = linear_model()
    x, y = batch(0)
    with pytest.raises(ValueError, match="num_classes"):
        make_attack("targeted_pgd", 0.1, 0.01, 1, "linf", (0, 1), NLL_SUM)(model, x, y)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_soft_labels_are_reduced_to_their_argmax(norm):
    model = conv_model(1)
    x, y = batch(4)
    soft = F.one_hot(y, NUM_CLASSES).float() * 0.7 + 0.03
    fn = make_attack("pgd", 0.1, 0.03, 3, norm, (0, 1), NLL_SUM)
    torch.manual_seed(7)
    with_hard = fn(model, x, y)
    torch.manual_seed(7)
    with_soft = fn(model, x, soft)
    assert torch.equal(with_hard, with_soft)


def test_attack_never_touches_parameter_gradients():
    model = conv_model(2, bn=True)
    frozen = model[0].weight
    frozen.requires_grad_(False)
    existing = torch.ones_like(model[-1].bias)
    model[-1].bias.grad = existing.clone()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    x, y = batch(5)
    for name in ["pgd", "targeted_pgd"]:
        for norm in ["linf", "l2"]:
            make_attack(name, 0.1, 0.03, 2, norm, (0, 1), NLL_SUM, num_classes=NUM_CLASSES)(model, x, y)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    for name, p in model.named_parameters():
        if name == f"{len(model) - 1}.bias":
            assert torch.equal(p.grad, existing)
        else:
            assert p.grad is None, name


def test_pgd_calls_mark_step_once_per_iteration_and_tolerates_plain_objects():
    class Env:
        count = 0

        def mark_step(self):
            self.count += 1

    env = Env()
    model = linear_model()
    x, y = batch(0)
    make_attack("pgd", 0.1, 0.03, 3, "linf", (0, 1), NLL_SUM, dev_env=env)(model, x, y)
    assert env.count == 3
    make_attack("pgd", 0.1, 0.03, 3, "linf", (0, 1), NLL_SUM, dev_env=object())(model, x, y)


def test_pgd_under_autocast():
    model = conv_model(3)
    x, y = batch(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv, losses = pgd(model, x, y, 0.1, 0.03, 2, (0, 1), criterion=NLL_SUM, return_losses=True,
                            **norm_fns("linf"))
    assert x_adv.dtype == torch.float32 and losses.dtype == torch.float32
    assert_in_threat_model(x_adv, x, 0.1, "linf")


def test_pgd_raw_gradient_step():
    # take_sign=False, normalize=False: the step is step_size * gradient (no projection effect
    # with a huge eps and box).
    model = linear_model()
    x, y = batch(0)
    identity_init = lambda x, eps, project_fn, boundaries: x.clone()  # noqa: E731
    x_adv = pgd(model, x, y, 100.0, 0.5, 1, (-1e3, 1e3), identity_init, project_linf, NLL_SUM,
                take_sign=False)
    xr = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    assert torch.allclose(x_adv, x + 0.5 * grad, atol=1e-6)


# ------------------------------------------------------------------------------------------
# init / projection / step helpers
# ------------------------------------------------------------------------------------------

def _no_projection(x, x_adv, eps, boundaries):
    return x_adv


def test_l2_random_start_has_mean_minus_eps():
    torch.manual_seed(0)
    eps = 0.25
    x = torch.zeros(200_000)
    noise = init_l2(x, eps, _no_projection, (0, 1)) - x
    assert noise.mean().item() == pytest.approx(-eps + 1e-5, abs=3e-3)  # faithful quirk: N(-eps, eps)
    assert noise.std().item() == pytest.approx(eps, rel=1e-2)


def test_linf_random_start_is_uniform_plus_offset():
    torch.manual_seed(0)
    eps = 0.25
    noise = init_linf(torch.zeros(200_000), eps, _no_projection, (0, 1))
    assert noise.min().item() >= -eps + 1e-5 - 1e-7 and noise.max().item() <= eps + 1e-5 + 1e-7
    assert noise.mean().item() == pytest.approx(1e-5, abs=3e-3)
    assert noise.std().item() == pytest.approx(eps / math.sqrt(3), rel=1e-2)


def test_projections():
    x = torch.full((2, 3), 0.5)
    far = x + torch.tensor([[1.0, -1.0, 0.01], [0.0, 0.0, 0.0]])
    assert torch.allclose(project_linf(x, far, 0.1, (0, 1)), torch.tensor([[0.6, 0.4, 0.51], [0.5, 0.5, 0.5]]))
    p = project_l2(x, far, 0.1, (-10, 10))
    assert (p - x)[0].norm().item() == pytest.approx(0.1, rel=1e-5)
    assert torch.equal(p[1], x[1])
    assert project_linf(x, x + 3, 5.0, (0, 1)).max().item() == 1.0


def test_l2_direction_is_unit_norm_per_example_and_safe_at_zero():
    g = torch.randn(3, *SHAPE)
    g[1] = 0
    d = l2_direction(g)
    norms = d.flatten(1).norm(dim=1)
    assert norms[0].item() == pytest.approx(1.0, rel=1e-5) and norms[2].item() == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(d[1], torch.zeros_like(d[1]))


# ------------------------------------------------------------------------------------------
# AdvTrainingLoss
# ------------------------------------------------------------------------------------------

def adv_cfg(**overrides) -> AttackCfg:
    cfg = dict(name="pgd", eps=0.1, eps_schedule="constant", eps_schedule_period=0, zero_eps_epochs=0,
               step_size=0.05, steps=2, norm="linf", boundaries=(0.0, 1.0))
    cfg.update(overrides)
    return AttackCfg(**cfg)


def spy_on_attack(loss_fn, model):
    """Record BN statistics and the model mode right after crafting."""
    seen = {}
    attack = loss_fn.attack

    def spy(m, x, y, epoch):
        x_adv = attack(m, x, y, epoch)
        seen.update(state=bn_state(model), training=model.training, x_adv=x_adv)
        return x_adv

    loss_fn.attack = spy
    return seen


def test_adv_loss_eval_mode_keeps_bn_statistics_while_crafting():
    model = conv_model(0, bn=True).train()
    x, y = batch(0, 8)
    before = bn_state(model)
    loss_fn = AdvTrainingLoss(adv_cfg(), nn.CrossEntropyLoss(), num_classes=NUM_CLASSES, eval_mode=True)
    seen = spy_on_attack(loss_fn, model)
    loss, clean_logits, adv_logits = loss_fn(model, x, y, epoch=3)
    assert seen["training"] is False
    assert same_state(seen["state"], before)
    assert not torch.equal(seen["x_adv"], x)
    # faithful default: clean and adversarial forwards both ran in train mode
    assert model.training
    assert model[1].num_batches_tracked.item() == 2
    assert clean_logits.requires_grad and adv_logits.requires_grad
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_adv_loss_train_mode_crafting_moves_bn_statistics():
    model = conv_model(0, bn=True).train()
    x, y = batch(0, 8)
    before = bn_state(model)
    loss_fn = AdvTrainingLoss(adv_cfg(), nn.CrossEntropyLoss(), num_classes=NUM_CLASSES, eval_mode=False)
    seen = spy_on_attack(loss_fn, model)
    loss_fn(model, x, y, epoch=3)
    assert seen["training"] is True
    assert not same_state(seen["state"], before)


def test_adv_loss_nograd_clean_logits_leave_bn_to_the_adversarial_forward():
    model = conv_model(0, bn=True).train()
    reference = copy.deepcopy(model)
    x, y = batch(1, 8)
    x_adv = (x + 0.05).clamp(0, 1)
    loss_fn = AdvTrainingLoss(adv_cfg(), nn.CrossEntropyLoss(), eval_mode=True, clean_logits="nograd")
    loss_fn.attack = lambda m, x_, y_, epoch: x_adv
    loss, clean_logits, adv_logits = loss_fn(model, x, y, epoch=0)

    with torch.no_grad():
        expected_clean = reference.eval()(x)
    reference.train()
    expected_adv = reference(x_adv)
    assert torch.allclose(clean_logits, expected_clean, atol=1e-6) and not clean_logits.requires_grad
    assert torch.allclose(adv_logits, expected_adv, atol=1e-6)
    assert torch.allclose(loss, F.cross_entropy(expected_adv, y), atol=1e-6)
    assert same_state(bn_state(model), bn_state(reference))
    assert model[1].num_batches_tracked.item() == 1 and model.training


def test_adv_loss_skip_clean_logits():
    model = conv_model(0, bn=True).train()
    x, y = batch(2, 8)
    loss, clean_logits, adv_logits = AdvTrainingLoss(adv_cfg(), nn.CrossEntropyLoss(), clean_logits="skip")(
        model, x, y, epoch=0)
    assert clean_logits is None and adv_logits.shape == (8, NUM_CLASSES)
    assert model[1].num_batches_tracked.item() == 1
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_adv_loss_restores_train_mode_and_validates_options():
    model = conv_model(0, bn=True).eval()
    x, y = batch(3)
    AdvTrainingLoss(adv_cfg(), nn.CrossEntropyLoss())(model, x, y, epoch=0)
    assert model.training
    with pytest.raises(ValueError, match="clean_logits must be one of"):
        AdvTrainingLoss(adv_cfg(), nn.CrossEntropyLoss(), clean_logits="cheap")


def test_adv_loss_uses_the_scheduled_eps_and_soft_targets():
    model = conv_model(0)
    x, y = batch(4)
    soft = F.one_hot(y, NUM_CLASSES).float()
    cfg = adv_cfg(eps_schedule="linear", eps_schedule_period=10)
    loss_fn = AdvTrainingLoss(cfg, lambda logits, t: torch.sum(-t * F.log_softmax(logits, -1), -1).mean())
    seen = spy_on_attack(loss_fn, model)
    loss_fn(model, x, soft, epoch=0)
    assert torch.equal(seen["x_adv"], x)  # epoch 0 of the linear warm-up: eps 0
    loss_fn(model, x, soft, epoch=5)
    assert_in_threat_model(seen["x_adv"], x, 0.05, "linf")


# ------------------------------------------------------------------------------------------
# TRADESLoss
# ------------------------------------------------------------------------------------------

def manual_trades(model, x, x_adv, y, beta):
    model.train()
    logits, logits_adv = model(x), model(x_adv)
    p = F.softmax(logits, dim=-1)
    kl = torch.sum(p * (torch.log(p) - F.log_softmax(logits_adv, dim=-1)))
    return F.cross_entropy(logits, y) + beta * kl / x.shape[0], logits, logits_adv


def test_trades_loss_matches_hand_computation_with_fixed_adversarial_batch():
    model = conv_model(0, bn=True).train()
    reference = copy.deepcopy(model)
    x, y = batch(5, 8)
    x_adv = (x - 0.05).clamp(0, 1)
    loss_fn = TRADESLoss(adv_cfg(), nn.CrossEntropyLoss(), beta=6.0)
    targets = {}

    def fixed_attack(m, x_, p_clean, epoch):
        targets.update(p=p_clean, training=m.training)
        return x_adv

    loss_fn.attack = fixed_attack
    loss, logits, logits_adv = loss_fn(model, x, y, epoch=0)
    with torch.no_grad():
        expected_p = F.softmax(copy.deepcopy(reference).eval()(x), dim=-1)
    assert targets["training"] is False
    assert torch.allclose(targets["p"], expected_p, atol=1e-6)
    expected, _, _ = manual_trades(reference, x, x_adv, y, 6.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_trades_loss_matches_hand_computation_with_seeded_attack():
    model = conv_model(1)
    x, y = batch(6, 8)
    cfg = adv_cfg(eps=0.1, step_size=0.03, steps=3)
    torch.manual_seed(11)
    loss, _, _ = TRADESLoss(cfg, nn.CrossEntropyLoss(), beta=3.0)(model, x, y, epoch=0)

    torch.manual_seed(11)
    with torch.no_grad():
        p_clean = F.softmax(model.eval()(x), dim=-1)
    x_adv = pgd(model, x, p_clean, 0.1, 0.03, 3, (0, 1), criterion=nn.KLDivLoss(reduction="sum"), logits_y=True,
                **norm_fns("linf"))
    expected, _, _ = manual_trades(model, x, x_adv, y, 3.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not torch.equal(x_adv, x)


def test_trades_with_zero_eps_is_the_natural_loss():
    model = conv_model(2)
    x, y = batch(7)
    loss, logits, _ = TRADESLoss(adv_cfg(eps=0.0), nn.CrossEntropyLoss(), beta=6.0)(model, x, y, epoch=0)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item(), abs=1e-5)


def test_trades_rejects_targeted_attacks():
    with pytest.raises(ValueError, match="untargeted"):
        TRADESLoss(adv_cfg(name="targeted_pgd"), nn.CrossEntropyLoss(), beta=6.0, num_classes=NUM_CLASSES)


# ------------------------------------------------------------------------------------------
# AutoAttack adapter
# ------------------------------------------------------------------------------------------

class ConstantLogits(nn.Module):
    """Ignores its input: robust by construction (its gradient is exactly zero)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("logits", torch.arange(NUM_CLASSES, dtype=torch.float32))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1) + 0.0 * x.flatten(1).sum(1, keepdim=True)


class FewClasses(nn.Module):
    """Constant logits over ``k`` classes (robust by construction, zero gradient)."""

    def __init__(self, k):
        super().__init__()
        self.register_buffer("logits", torch.arange(float(k)))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1) + 0.0 * x.flatten(1).sum(1, keepdim=True)


class DynamicDefense(nn.Module):
    """Computes an input gradient inside forward: what AutoAttack calls a dynamic defense."""

    def __init__(self):
        super().__init__()
        self.body = linear_model()

    def forward(self, x):
        with torch.enable_grad():
            z = x.detach().requires_grad_(True)
            g, = torch.autograd.grad(self.body(z).sum(), z)
        return self.body(x) + 0.0 * g.flatten(1).sum(1, keepdim=True)


class HalfLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = linear_model()

    def forward(self, x):
        return self.body(x).half()


def predicted_batch(model, n=4, seed=0):
    x, _ = batch(seed, n)
    with torch.no_grad():
        return x, model(x).argmax(dim=1)


def test_norm_names():
    assert autoattack_norm("linf") == "Linf" and autoattack_norm("LINF") == "Linf" and autoattack_norm("l2") == "L2"
    with pytest.raises(ValueError, match="unknown norm"):
        autoattack_norm("l3")
    with pytest.raises(ValueError, match="unknown AutoAttack version"):
        make_autoattack("fast", 0.1, "linf")


@pytest.mark.parametrize("norm,eps", [("linf", 0.5), ("l2", 4.0)])
def test_apgd_ce_breaks_a_weak_model_within_the_ball(norm, eps):
    model = conv_model(0)
    x, y = predicted_batch(model)
    attack = make_attack("apgd-ce", eps, 0.0, 0, norm, (0, 1), NLL_SUM, num_classes=NUM_CLASSES, dev_env=object(),
                         seed=0)
    assert isinstance(attack, AutoAttackFn)
    x_adv = attack(model, x, y)
    assert_in_threat_model(x_adv, x, eps, norm)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) != y).all()
    assert attack.flags == [] and attack.calls == 1


def test_standard_autoattack_breaks_a_weak_model():
    model = conv_model(1)
    x, y = predicted_batch(model)
    result = run_autoattack(model, x, y, version="standard", norm="linf", eps=0.5, seed=0)
    assert not result.robust.any()
    assert result.flags == []
    assert_in_threat_model(result.x_adv, x, 0.5, "linf")


def test_apgd_ce_on_a_model_robust_by_construction():
    model = ConstantLogits().eval()
    x, _ = batch(0, 2)
    y = torch.full((2,), NUM_CLASSES - 1)
    result = run_autoattack(model, x, y, version="apgd-ce", norm="Linf", eps=0.5, seed=0)
    assert result.robust.all()
    assert torch.equal(result.x_adv, x)
    assert result.flags == []


def test_apgd_ce_uses_five_restarts(monkeypatch):
    from pyautoattack.autopgd_base import APGDAttack

    seen = []
    original = APGDAttack.perturb

    def spy(self, x, y=None, **kw):
        seen.append(self.n_restarts)
        return original(self, x, y, **kw)

    monkeypatch.setattr(APGDAttack, "perturb", spy)
    model = conv_model(0)
    x, y = predicted_batch(model, n=2)
    run_autoattack(model, x, y, version="apgd-ce", norm="linf", eps=0.5, seed=0)
    run_autoattack(model, x, y, version="standard", norm="linf", eps=0.5, seed=0)
    assert seen == [5, 1]


def test_same_seed_same_result_and_caller_rng_untouched():
    model = conv_model(2)
    x, y = predicted_batch(model)
    attack = make_autoattack("apgd-ce", 0.5, "linf", seed=3)
    torch.manual_seed(123)
    first = attack(model, x, y)
    after_first = torch.rand(3)
    torch.manual_seed(123)
    second = attack(model, x, y)
    assert torch.equal(first, second)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after_first)  # AutoAttack's internal reseeding did not leak
    other = make_autoattack("apgd-ce", 0.5, "linf", seed=4)(model, x, y)
    assert not torch.equal(first, other)


def test_randomized_model_is_flagged_and_logged_once(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(math.prod(SHAPE), NUM_CLASSES)).train()
    x, y = batch(1, 2)
    attack = make_autoattack("apgd-ce", 0.5, "linf", seed=0)
    with caplog.at_level(logging.WARNING, logger="robust_vits"):
        attack(model, x, y)
        attack(model, x, y)
    assert any("randomized defense" in f for f in attack.last_flags)
    assert TRAIN_MODE_FLAG in attack.flags
    assert all(count == 2 for count in attack.flag_counts.values())
    assert f"{TRAIN_MODE_FLAG} (in 2 of 2 batches)" in attack_flags(attack)
    assert attack_flags(make_attack("pgd", 0.1, 0.01, 1, "linf", (0, 1), NLL_SUM)) == []
    logged = [r.getMessage() for r in caplog.records if r.name == "robust_vits"]
    assert sum("randomized defense" in m for m in logged) == 1


def test_dynamic_defense_is_flagged_and_does_not_stick():
    x, _ = batch(2, 2)
    dynamic = DynamicDefense().eval()
    with torch.no_grad():
        y = dynamic(x).argmax(1)
    flagged = run_autoattack(dynamic, x, y, version="apgd-ce", norm="linf", eps=0.5, seed=0, log_flags=False)
    assert any("dynamic defense" in f for f in flagged.flags)
    plain = conv_model(3)
    x, y = predicted_batch(plain, n=2)
    assert run_autoattack(plain, x, y, version="apgd-ce", norm="linf", eps=0.5, seed=0).flags == []


def test_probability_outputs_are_flagged():
    model = nn.Sequential(linear_model(), nn.Softmax(dim=-1)).eval()
    x, y = predicted_batch(model, n=2)
    result = run_autoattack(model, x, y, version="apgd-ce", norm="linf", eps=0.5, seed=0, log_flags=False)
    assert any("probability distribution" in f for f in result.flags)


def test_half_precision_logits_are_tolerated():
    model = HalfLogits().eval()
    x, y = predicted_batch(model)
    result = run_autoattack(model, x, y, version="apgd-ce", norm="linf", eps=0.5, seed=0)
    assert not result.robust.any() and result.x_adv.dtype == torch.float32


def test_verbose_forwards_progress_lines(caplog):
    model = conv_model(4)
    x, y = predicted_batch(model, n=2)
    with caplog.at_level(logging.INFO, logger="robust_vits"):
        run_autoattack(model, x, y, version="apgd-ce", norm="linf", eps=0.5, seed=0, verbose=True)
    assert any(r.getMessage().startswith("AutoAttack: ") for r in caplog.records)
    assert logging.getLogger("auto-attack").propagate  # restored


def test_make_attack_autoattack_kwargs():
    attack = make_attack("autoattack", 0.1, 0.0, 0, "l2", (0, 1), NLL_SUM, verbose=False, seed=1, num_classes=10)
    assert isinstance(attack, AutoAttackFn) and attack.version == "standard" and attack.norm == "l2"
    with pytest.raises(ValueError, match="does not take"):
        make_attack("apgd-ce", 0.1, 0.0, 0, "linf", (0, 1), NLL_SUM, return_losses=True)


def test_standard_autoattack_on_a_robust_model_with_few_classes():
    # pyautoattack hard-codes 9 target classes and crashes below 10 classes; the adapter uses
    # n_classes - 1 targets and says so. Nothing breaks, so all four attacks run (one image).
    model = FewClasses(4).eval()
    x, _ = batch(3, 1)
    y = torch.full((1,), 3)
    result = run_autoattack(model, x, y, version="standard", norm="linf", eps=0.01, seed=0)
    assert result.robust.all() and torch.equal(result.x_adv, x)
    assert any("APGD-T uses 3 target classes" in f for f in result.flags)
    assert any("FAB-T uses 3 target classes" in f for f in result.flags)
    assert any("zero gradient" in f for f in result.flags)
    assert len(result.flags) == len(set(result.flags))


def test_standard_autoattack_refuses_three_classes():
    model = FewClasses(3).eval()
    x, _ = batch(3, 1)
    with pytest.raises(ValueError, match="needs at least 4 classes"):
        run_autoattack(model, x, torch.full((1,), 2), version="standard", norm="linf", eps=0.01)
