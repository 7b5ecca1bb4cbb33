"""The fast paths compute the same thing: bfloat16 autocast and channels-last through attack and
update, no host synchronisation per training step or attack iteration, the in-memory digits path.

Tolerance of the robust-accuracy comparisons: both attacks run on the same n examples of one fixed
model, so their robust accuracies p1, p2 must agree within 3 standard errors of the difference of two
independent binomial estimates, ``3 * sqrt(2 p (1 - p) / n)`` (8.7 points at p = 0.5, n = 297); the
pairing (same examples, same random start) makes the true spread smaller, so this is conservative.
Each test also checks the attack still attacks, so "equal" cannot come from two no-op attacks.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import tests.tiny_models  # noqa: F401  (registers tiny_cnn_test)
from src.attacks import AdvTrainingLoss, AttackCfg, make_attack
from src.bits.device import DeviceEnv
from src.data import DigitsDataset, build_eval_transform, build_train_transform, create_loader, is_native_to_tensor
from src.engine import EpochHooks, StepOptions, TrainParts, craft_adversarial, evaluate, train_one_epoch

CPU = torch.device("cpu")
STEPS = 5  # PGD-5 with step 2.5 eps / 5


def _digits_tensors(split):
    ds = DigitsDataset(split, transform=build_eval_transform(
        {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic"}))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    return x, torch.as_tensor(ds.targets)


@pytest.fixture(scope="module")
def fixed_model():
    """A TinyCNN fitted on digits (clean, a few epochs): a fixed model with mid-range robustness."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("tiny_cnn_test", num_classes=10)
    x, y = _digits_tensors("train")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(6):
        for i in torch.randperm(len(y)).split(50):
            opt.zero_grad()
            F.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
    model.eval()
    return model


@pytest.fixture(scope="module")
def val():
    return _digits_tensors("validation")


def _robust_acc(model, x_adv, y):
    with torch.no_grad():
        return float((model(x_adv).argmax(-1) == y).float().mean())


def _craft(model, x, y, eps, dev_env, steps=STEPS):
    attack = make_attack("pgd", eps, 2.5 * eps / steps, steps, "linf", (0, 1), nn.NLLLoss(reduction="sum"))
    torch.manual_seed(1)  # the same random start for every variant
    return torch.cat([craft_adversarial(model, attack, xb, yb, dev_env) for xb, yb in
                      zip(x.split(100), y.split(100))])


def _tolerance(p, n):
    return 3 * math.sqrt(2 * p * (1 - p) / n)


@pytest.fixture(scope="module")
def eps_and_fp32(fixed_model, val):
    """The smallest eps of a grid where float32 PGD-5 leaves 20-80 % robust (noise is largest there)."""
    x, y = val
    clean = _robust_acc(fixed_model, x, y)
    for eps_255 in (1, 2, 3, 4, 6, 8, 12, 16):
        x_adv = _craft(fixed_model, x, y, eps_255 / 255, DeviceEnv(CPU))
        acc = _robust_acc(fixed_model, x_adv, y)
        if 0.2 <= acc <= 0.8:
            print(f"eps {eps_255}/255: clean {clean:.3f} robust {acc:.3f}")
            return eps_255 / 255, acc, clean, x_adv
    pytest.fail(f"no eps in the grid gives a mid-range robust accuracy (clean {clean:.3f})")


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_bf16_crafted_pgd_matches_float32_within_binomial_noise(fixed_model, val, eps_and_fp32, channels_last):
    x, y = val
    eps, acc32, clean, x_adv32 = eps_and_fp32
    dev = DeviceEnv(CPU, amp=True, amp_dtype=torch.bfloat16, channels_last=channels_last)
    model = fixed_model
    if channels_last:
        model = fixed_model.to(memory_format=torch.channels_last)
        x_in = x.contiguous(memory_format=torch.channels_last)
    else:
        x_in = x
    x_adv16 = _craft(model, x_in, y, eps, dev)
    fixed_model.to(memory_format=torch.contiguous_format)
    # the attack's iterate and projection stay float32: exactly inside the eps ball and the box
    assert x_adv16.dtype == torch.float32
    assert float((x_adv16 - x).abs().max()) <= eps + 1e-7
    assert float(x_adv16.min()) >= 0 and float(x_adv16.max()) <= 1
    acc16 = _robust_acc(fixed_model, x_adv16.contiguous(), y)
    n = len(y)
    tol = _tolerance(acc32, n)
    assert abs(acc16 - acc32) <= tol, (acc16, acc32, tol)
    # and it is an attack: it removes most of the clean accuracy it can
    assert acc16 <= clean - 0.1, (acc16, clean)
    # the two attacks mostly move the pixels the same way (the sign of the same gradient)
    agree = float(((x_adv16 - x).sign() == (x_adv32 - x).sign()).float().mean())
    assert agree > 0.6, agree


def test_channels_last_float32_crafts_the_same_examples(fixed_model, val, eps_and_fp32):
    x, y = val
    eps, acc32, _, x_adv32 = eps_and_fp32
    dev = DeviceEnv(CPU, channels_last=True)
    model = fixed_model.to(memory_format=torch.channels_last)
    try:
        x_adv = _craft(model, x.contiguous(memory_format=torch.channels_last), y, eps, dev)
    finally:
        fixed_model.to(memory_format=torch.contiguous_format)
    acc = _robust_acc(fixed_model, x_adv.contiguous(), y)
    assert abs(acc - acc32) <= _tolerance(acc32, len(y))
    # float32 in another memory layout changes only summation order: nearly every pixel identical
    assert float((x_adv - x_adv32).abs().le(1e-6).float().mean()) > 0.95


def test_evaluate_under_bf16_reports_float32_robust_accuracy_within_noise(fixed_model, val, eps_and_fp32):
    """validate.py --amp --amp-dtype bfloat16: crafting and the metric forwards under autocast."""
    x, y = val
    eps, acc32, clean, _ = eps_and_fp32
    loader = [(xb, yb) for xb, yb in zip(x.split(100), y.split(100))]
    attack = make_attack("pgd", eps, 2.5 * eps / STEPS, STEPS, "linf", (0, 1), nn.NLLLoss(reduction="sum"))
    torch.manual_seed(1)
    res16 = evaluate(fixed_model, loader, DeviceEnv(CPU, amp=True, amp_dtype=torch.bfloat16), attack=attack)
    assert abs(res16["robust_top1"] / 100 - acc32) <= _tolerance(acc32, len(y))
    assert abs(res16["top1"] / 100 - clean) <= 0.02  # bf16 logits flip at most a few argmaxes


# ----------------------------------------------------------------------------------------------
# Host synchronisation: counted as aten._local_scalar_dense (what .item(), bool(), float() run)
# ----------------------------------------------------------------------------------------------

class _SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_pgd_iterations_never_sync_with_the_host(fixed_model, val):
    x, y = val
    attack = make_attack("pgd", 8 / 255, 2 / 255, 5, "linf", (0, 1), nn.NLLLoss(reduction="sum"))
    with _SyncCounter() as c:
        attack(fixed_model, x[:20], y[:20])
    assert c.count == 0


def _epoch_syncs(num_batches, log_interval, skip_nonfinite=False, nan_at=None):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("tiny_cnn_test", num_classes=10)
    x, y = _digits_tensors("validation")
    loader = [(x[i * 10:(i + 1) * 10], y[i * 10:(i + 1) * 10]) for i in range(num_batches)]
    cfg = AttackCfg("pgd", 4 / 255, "constant", 0, 0, 1 / 255, 2, "linf", (0.0, 1.0))
    loss_fn = AdvTrainingLoss(cfg, nn.CrossEntropyLoss(), clean_logits="skip")
    if nan_at is not None:
        inner = loss_fn
        calls = []

        def loss_fn(model, xb, yb, epoch):  # noqa: F811
            calls.append(1)
            loss, c, a = inner(model, xb, yb, epoch)
            return (loss * float("nan") if len(calls) - 1 == nan_at else loss), c, a
    parts = TrainParts(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), loss_fn)
    with _SyncCounter() as c:
        out = train_one_epoch(0, parts, loader, DeviceEnv(CPU), StepOptions(skip_nonfinite=skip_nonfinite),
                              EpochHooks(log_interval=log_interval))
    return c.count, out, model


def test_training_steps_sync_once_per_log_interval_not_per_step():
    few = _epoch_syncs(4, log_interval=1000)[0]
    many = _epoch_syncs(12, log_interval=1000)[0]
    assert many == few  # the per-epoch flush and checks only: nothing grows with the step count
    logged = _epoch_syncs(12, log_interval=4)[0]
    assert logged - many <= 3 * 2  # at most two syncs (the guard, the loss on the log line) per interval
    # the counter sees per-step syncs: --skip-nonfinite decides every step on the host, by design
    per_step = [_epoch_syncs(n, log_interval=1000, skip_nonfinite=True)[0] for n in (4, 12)]
    assert per_step[1] - per_step[0] == 8


def test_nonfinite_step_is_named_at_the_next_check_and_skip_mode_still_skips():
    from src.errors import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"epoch 0, step 5 of the epoch \(global step 5\)"):
        _epoch_syncs(12, log_interval=1000, nan_at=5)
    _, out, model = _epoch_syncs(12, log_interval=1000, skip_nonfinite=True, nan_at=5)
    assert out["state"].skipped_steps == 1 and out["num_updates"] == 11
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# In-memory data: no PIL round trip where the transform is ToTensor at the native size
# ----------------------------------------------------------------------------------------------

def test_digits_tensor_path_equals_the_pil_path():
    from argparse import Namespace

    args = Namespace(no_aug=True)
    cfg = {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic"}
    for transform in (build_train_transform(args, cfg), build_eval_transform(cfg)):
        ds = DigitsDataset("validation", transform=transform)
        assert is_native_to_tensor(transform, (32, 32))
        fast = [ds[i] for i in range(0, len(ds), 7)]
        assert ds._tensors is not None
        for (img, label), i in zip(fast, range(0, len(ds), 7)):
            from PIL import Image
            slow = transform(Image.fromarray(ds.images[i]))
            assert torch.equal(img, slow) and label == int(ds.targets[i])
    # any other chain keeps the PIL path
    resized = build_eval_transform({"input_size": (3, 32, 32), "crop_pct": 0.875, "interpolation": "bicubic"})
    assert not is_native_to_tensor(resized, (32, 32))
    ds = DigitsDataset("validation", transform=resized)
    img, _ = ds[0]
    assert ds._tensors is None and img.shape == (3, 32, 32)
    aug = build_train_transform(Namespace(no_aug=False, rand_crop=True, pad=4, hflip=0.5, vflip=0, aa=None,
                                          color_jitter=None, rand_rotation=0), cfg)
    assert not is_native_to_tensor(aug, (32, 32))


def test_digits_loader_batches_are_the_same_either_way():
    from torchvision import transforms

    cfg = {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic"}
    fast = DigitsDataset("train", transform=build_eval_transform(cfg))
    slow = DigitsDataset("train", transform=transforms.Compose([transforms.Lambda(lambda im: im),
                                                                transforms.ToTensor()]))
    assert not is_native_to_tensor(slow.transform, (32, 32))
    for (xa, ya), (xb, yb) in zip(create_loader(fast, 64, True, seed=3), create_loader(slow, 64, True, seed=3)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert np.array_equal(fast.targets, slow.targets)


@pytest.mark.parametrize("native", [True, False])
def test_amp_on_a_cpu_without_native_bf16_warns(monkeypatch, caplog, native):
    import logging

    import src.bits.device as D

    monkeypatch.setattr(D, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="robust_vits"):
        env = D.initialize_device(amp=True, xla=False)
    assert env.amp_dtype == torch.bfloat16
    warned = [r for r in caplog.records if "no native bfloat16" in r.getMessage()]
    assert bool(warned) is (not native)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="robust_vits"):
        D.initialize_device(amp=False, xla=False)  # float32: nothing to say
    assert not [r for r in caplog.records if "bfloat16" in r.getMessage()]


def test_finite_flag_sees_nan_and_inf_anywhere_but_not_large_finite_gradients():
    from src.engine import finite_flag

    def params(*grads):
        out = []
        for g in grads:
            p = nn.Parameter(torch.zeros_like(g))
            p.grad = g
            out.append(p)
        return out

    one = torch.tensor(1.0)
    assert bool(finite_flag(one, params(torch.tensor([3e19, -3e19]), torch.ones(3))))  # its 2-norm overflows
    assert not bool(finite_flag(one, params(torch.ones(3), torch.tensor([0.0, float("nan")]))))
    assert not bool(finite_flag(one, params(torch.tensor([float("-inf")]))))
    assert not bool(finite_flag(torch.tensor(float("nan")), params(torch.ones(2))))
